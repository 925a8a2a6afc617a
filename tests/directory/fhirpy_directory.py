"""The directory through fhirpy, an off-the-shelf FHIR client that knows nothing of this
project, as a GP system or a VCS platform would use it: search services by need category
and area, follow `_include` to their organisations and places, page through every service,
find places by postcode, read one service. Every resource returned is appended to OUT
(JSON lines) for the independent validator (tests/conformance/validate.js).

usage: python fhirpy_directory.py BASE_URL TOKEN OUT.jsonl
"""

import json
import sys

from fhirpy import SyncFHIRClient

BASE, TOKEN, OUT = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
client = SyncFHIRClient(BASE, authorization=f"Bearer {TOKEN}")
returned = []
checks = 0


def keep(resource):
    if resource:
        returned.append(json.loads(json.dumps(resource)))
    return resource


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1
    print(f"ok - {what}", flush=True)


# Services for loneliness in BB9, with their organisations and places.
bundle = keep(
    client.resources("HealthcareService")
    .search(**{"service-category": "loneliness", "coverage-area": "Location/district-BB9", "active": "true"})
    .include("HealthcareService", "organization")
    .include("HealthcareService", "location")
    .fetch_raw()
)
entries = bundle.get("entry", [])
matches = [e["resource"] for e in entries if e["search"]["mode"] == "match"]
included = {f'{e["resource"]["resourceType"]}/{e["resource"]["id"]}' for e in entries if e["search"]["mode"] == "include"}
check(matches and all(m["resourceType"] == "HealthcareService" for m in matches), "search by category and area finds services")
check(all(m["active"] for m in matches), "active=true finds only active services")
for m in matches:
    check(m["providedBy"]["reference"] in included, f'{m["name"]}: its organisation is included')
    for loc in m.get("location", []):
        check(loc["reference"] in included, f'{m["name"]}: its place is included')
codes = {c["code"] for m in matches for cc in m.get("category", []) for c in cc["coding"]}
check("loneliness" in codes, "each match has the need category searched for")

# Every service, page by page (fetch_all follows the Bundle's next links).
everything = client.resources("HealthcareService").limit(200).fetch_all()
check(len(everything) > 500, f"fetch_all pages through every service ({len(everything)})")
check(len({s.id for s in everything}) == len(everything), "no service twice across pages")
for s in everything[:3]:
    keep(s.serialize())

# Places in a postcode district, and one service read by id.
places = client.resources("Location").search(**{"address-postalcode": "BB9"}).fetch_all()
check(any(p.id == "district-BB9" for p in places), "the district itself is a Location")
for p in places[:5]:
    keep(p.serialize())
one = client.reference("HealthcareService", matches[0]["id"]).to_resource()
keep(one.serialize())
check(one["name"] == matches[0]["name"], "read by id")
org = client.reference("Organization", "pendle-crafts").to_resource()
keep(org.serialize())
check(org["name"], "the provider's Organization reads from the directory")

with open(OUT, "w", encoding="utf-8") as f:
    for r in returned:
        f.write(json.dumps(r) + "\n")
print(f"{checks} passed, 0 failed", flush=True)
