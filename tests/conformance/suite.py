"""Black-box conformance suite: drives a running sp-gateway with fhirpy, an off-the-shelf
FHIR client that knows nothing of this project, exactly as a VCS platform or GP system
would. Every resource the server returns is appended to OUT (JSON lines) for the
independent validator (validate.js).

usage: python suite.py BASE_URL OUT.jsonl
"""

import json
import sys

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import (
    MultipleResourcesFound,
    OperationOutcome,
    ResourceNotFound,
)

BASE, OUT = sys.argv[1].rstrip("/"), sys.argv[2]
GP = "Bearer demo-gp-token"
VCS = "Bearer demo-provider-crafts-token"
OTHER_VCS = "Bearer demo-provider-money-token"

returned = []
checks = 0


def keep(resource):
    """Remembers a resource (or Bundle) the server returned, for validation."""
    if resource:
        returned.append(json.loads(json.dumps(resource)))
    return resource


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1
    print(f"ok {checks} - {what}")


def client(token, **headers):
    return SyncFHIRClient(BASE, authorization=token, extra_headers=headers or None)


def nhs_numbers():
    out, i = [], 1
    while len(out) < 12:
        n9 = "999%06d" % i
        c = 11 - sum(int(d) * w for d, w in zip(n9, range(10, 1, -1))) % 11
        c = 0 if c == 11 else c
        if c != 10:
            out.append(n9 + str(c))
        i += 1
    return out


def transaction(n, nhs):
    pid = f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": pid,
                "request": {"method": "POST", "url": "Patient"},
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
                    "name": [{"family": "Conformance", "given": [f"Test{n}"]}],
                    "birthDate": "1950-01-01",
                    "address": [{"postalCode": "BB9 7SR"}],
                },
            },
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-9000-{n:012d}",
                "request": {"method": "POST", "url": "ServiceRequest"},
                "resource": {
                    "resourceType": "ServiceRequest",
                    "identifier": [{"system": "https://gp.example/Id/referral/P81001", "value": f"CONF-{n}"}],
                    "status": "active",
                    "intent": "order",
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "871731000000106"}]},
                    "subject": {"reference": pid},
                    "requester": {"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "P81001"}},
                    "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "267076002"}]}],
                },
            },
        ],
    }


def main():
    gp, vcs = client(GP), client(VCS)

    # CapabilityStatement.
    cs = keep(requests.get(f"{BASE}/metadata").json())
    check(cs["fhirVersion"] == "4.0.1", "metadata: fhirVersion 4.0.1")

    # Create via transaction (fhirpy's raw execute), seven referrals.
    nhs = nhs_numbers()
    srs = []
    for n in range(7):
        resp = keep(gp.execute("", method="post", data=transaction(n, nhs[n])))
        check(resp["type"] == "transaction-response", f"transaction {n}: transaction-response")
        check(resp["entry"][1]["response"]["status"].startswith("201"), f"transaction {n}: created")
        srs.append(resp["entry"][1]["resource"]["id"])
    patient_ref = keep(gp.get("ServiceRequest", srs[0]))["subject"]["reference"]

    # Conditional create twice (fhirpy sends the condition as a search): one resource.
    def conditional():
        sr = gp.resource(
            "ServiceRequest",
            identifier=[{"system": "https://gp.example/Id/referral/P81001", "value": "CONF-COND"}],
            status="active",
            intent="order",
            code={"coding": [{"system": "http://snomed.info/sct", "code": "871731000000106"}]},
            subject={"reference": patient_ref},
            requester={"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "P81001"}},
        )
        sr.create(identifier="https://gp.example/Id/referral/P81001|CONF-COND")
        keep(sr.serialize())
        return sr.id

    first, second = conditional(), conditional()
    check(first == second, "conditional create twice: one ServiceRequest")
    hits = gp.resources("ServiceRequest").search(identifier="https://gp.example/Id/referral/P81001|CONF-COND").fetch_all()
    check(len(hits) == 1, "conditional create: identifier search finds exactly one")

    # Search with paging: the 7 lonely referrals went to the crafting group (the conditional
    # one, with no coded need, to the hub); 3 per page.
    pages = []
    bundle = keep(vcs.execute("Task", method="get", params={"owner": "Organization/pendle-crafts", "_count": 3}))
    while True:
        pages.append(bundle)
        nxt = [l["url"] for l in bundle.get("link", []) if l["relation"] == "next"]
        if not nxt:
            break
        bundle = keep(vcs.execute(nxt[0], method="get"))
    check(len(pages) >= 3, f"paging: {len(pages)} pages of 3")
    all_tasks = vcs.resources("Task").search(owner="Organization/pendle-crafts").limit(3).fetch_all()
    ids = [t.id for t in all_tasks]
    check(len(ids) == 7 and len(set(ids)) == 7, "fetch_all follows next links: 7 distinct Tasks")
    for t in all_tasks:
        keep(t.serialize())
    other = client(OTHER_VCS).resources("Task").search(owner="Organization/pendle-crafts").fetch_all()
    check(other == [], "another provider's search returns nothing of ours")

    # Read, vread, history.
    task_id = ids[0]
    task = vcs.reference("Task", task_id).to_resource()
    keep(task.serialize())
    check(task["status"] == "requested", "read Task")
    v1 = keep(vcs.execute(f"Task/{task_id}/_history/1", method="get"))
    check(v1["meta"]["versionId"] == "1", "vread version 1")

    # Update with a fresh ETag, then with the stale one.
    fresh = client(VCS, **{"If-Match": 'W/"1"'})
    t = fresh.resource("Task", **task.serialize())
    t["status"] = "accepted"
    t.save()
    keep(t.serialize())
    check(t["meta"]["versionId"] == "2", "update with fresh ETag: version 2")
    t["status"] = "in-progress"
    try:
        t.save()
        check(False, "update with stale ETag is refused")
    except (MultipleResourcesFound, OperationOutcome) as e:  # fhirpy reports 412 this way
        check("version" in str(e), "update with stale ETag: 412 with an OperationOutcome")
    # Plain fhirpy, as its users write it: fetch, change, save(). fhirpy sends no If-Match,
    # and the gateway does not require one (the state machine still judges the change).
    plain = [x for x in vcs.resources("Task").search(owner="Organization/pendle-crafts").fetch_all() if x.id == task_id][0]
    plain["status"] = "in-progress"
    plain.save()
    keep(plain.serialize())
    check(plain["meta"]["versionId"] == "3" and plain["status"] == "in-progress", "plain save() without If-Match: version 3")
    try:
        plain["status"] = "requested"
        plain.save()
        check(False, "an illegal change without If-Match is refused")
    except OperationOutcome:
        check(True, "plain save() of an illegal change: refused by the state machine")

    # Patch (fhirpy sends a merge patch), with the fresh ETag.
    patched = keep(client(VCS, **{"If-Match": 'W/"3"'}).patch("Task", task_id, note=[{"text": "first session booked"}]))
    check(patched["status"] == "in-progress" and patched["meta"]["versionId"] == "4", "patch: a note, version 4")
    hist = keep(vcs.execute(f"Task/{task_id}/_history", method="get"))
    check(len(hist["entry"]) == 4, "history: four versions")

    # Conditional read with the version fhirpy knows: 304 (fhirpy returns nothing).
    r = requests.get(f"{BASE}/Task/{task_id}", headers={"Authorization": VCS, "If-None-Match": 'W/"4"'})
    check(r.status_code == 304, "If-None-Match current version: 304")

    # $validate.
    sr = keep(gp.get("ServiceRequest", srs[1]))
    oo = keep(gp.execute("ServiceRequest/$validate", method="post", data=sr))
    check(oo["issue"][0]["severity"] == "information", "$validate: a stored ServiceRequest is valid")
    bad = dict(sr)
    bad["code"] = {"coding": [{"system": "http://snomed.info/sct", "code": "73761001"}]}
    oo = keep(gp.execute("ServiceRequest/$validate", method="post", data=bad))
    check(oo["issue"][0]["expression"] == ["ServiceRequest.code"], "$validate names ServiceRequest.code")

    # Feedback and completion, then the GP pulls the outcome.
    sr0 = gp.get("ServiceRequest", task["focus"]["reference"].split("/")[1])
    obs = vcs.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://snomed.info/sct", "code": "718466001"}]},
        subject=task["for"],
        basedOn=[task["focus"]],
        valueInteger=27,
    )
    obs.save()
    keep(obs.serialize())
    check(obs.id is not None, "Observation without a performer created")
    check(obs.serialize().get("performer") == [{"reference": "Organization/pendle-crafts"}], "the provider is its performer")
    done = client(VCS, **{"If-Match": 'W/"4"'}).patch(
        "Task",
        task_id,
        status="completed",
        output=[{"type": {"text": "SWEMWBS"}, "valueReference": {"reference": f"Observation/{obs.id}"}}],
    )
    keep(done)
    check(done["status"] == "completed", "Task completed")
    back = gp.resources("Observation").search(**{"based-on": f"ServiceRequest/{sr0['id']}"}).fetch_all()
    for o in back:
        keep(o.serialize())
    check([o["valueInteger"] for o in back] == [27], "GP pulls the outcome Observation")
    check(keep(gp.get("ServiceRequest", sr0["id"]))["status"] == "completed", "ServiceRequest completed with its Task")

    # Out of scope: 404.
    try:
        client(OTHER_VCS).get("Task", task_id)
        check(False, "another provider cannot read the Task")
    except ResourceNotFound:
        check(True, "another provider reads the Task: 404")

    with open(OUT, "w") as f:
        for r in returned:
            f.write(json.dumps(r) + "\n")
    print(f"{checks} passed, 0 failed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        print(f"not ok - {type(e).__name__}: {e}")
        print(f"{checks} passed, 1 failed")
        sys.exit(1)
