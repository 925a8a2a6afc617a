#!/usr/bin/env python3
"""Writes profiles/fhir-r4-cardinality.json: the FHIR R4 element rules the R4 JSON Schema
does not carry, for the resources the gateway takes as input and every type they contain.

Source: FHIR.js (npm `fhir` 4.12.0, ISC licence; the conformance suite installs it into
target/tmp/conformance-tools), whose profiles/types.json and valuesets.json are its parse of
HL7's R4 (4.0.1) StructureDefinitions and ValueSets (CC0). Run:

    python3 profiles/fhir-r4-cardinality.py \
        target/tmp/conformance-tools/node_modules/fhir/profiles \
        > profiles/fhir-r4-cardinality.json

For each type (a backbone element is named by its path, `Task.input`):
- `required`: elements with min cardinality 1 (not choices);
- `choices`: choice elements `value[x]` by stem, their member names, and whether one is
  required (only groups of more than one type, or required ones);
- `codes`: elements of type `code` bound to a value set with strength `required`, and the
  codes it allows (the schema has enums for only some of them);
- `children`: the elements of complex type to walk into, and their type.
"""
import json
import sys

ROOTS = ["Task", "Observation", "ServiceRequest", "Patient", "Element"]


def main(folder):
    types = json.load(open(f"{folder}/types.json"))
    valuesets = json.load(open(f"{folder}/valuesets.json"))

    def codes_of(url):
        vs = valuesets.get(url.split("|")[0])
        if not vs:
            return None
        codes = sorted({c["code"] for s in vs.get("systems", []) for c in s.get("codes", [])})
        return codes or None
    out = {}

    def props_at(dotted):
        parts = dotted.split(".")
        props = types[parts[0]]["_properties"]
        for part in parts[1:]:
            props = next(p for p in props if p["_name"] == part)["_properties"]
        return props

    def visit(name, props):
        if name in out:
            return
        entry = {"required": [], "choices": {}, "codes": {}, "children": {}}
        out[name] = entry
        pending = []
        for p in props:
            n, t = p["_name"], p["_type"]
            if n.startswith("_"):
                continue  # a primitive's extensions: walked as Element by the checker
            if p.get("_choice"):
                stem = p["_choice"].replace("[x]", "")
                g = entry["choices"].setdefault(stem, {"required": False, "members": []})
                g["members"].append(n)
                g["required"] = g["required"] or bool(p.get("_required"))
            elif p.get("_required"):
                entry["required"].append(n)
            if t == "code" and not p.get("_choice") and p.get("_valueSetStrength") == "required":
                codes = codes_of(p.get("_valueSet", ""))
                if codes:
                    entry["codes"][n] = codes
            if t in ("BackboneElement", "Element") and p.get("_properties"):
                child = f"{name}.{n}"
                entry["children"][n] = child
                pending.append((child, p["_properties"]))
            elif t.startswith("#"):  # contentReference to another backbone element
                entry["children"][n] = t[1:]
                pending.append((t[1:], None))
            elif t == "Resource" or t[0].islower():
                pass  # contained resources (schema only) and primitives
            else:
                entry["children"][n] = t
                pending.append((t, types[t]["_properties"]))
        entry["choices"] = {
            k: g for k, g in entry["choices"].items() if len(g["members"]) > 1 or g["required"]
        }
        for child, props in pending:
            visit(child, props if props is not None else props_at(child))

    for root in ROOTS:
        visit(root, types[root]["_properties"])
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
