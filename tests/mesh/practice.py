"""The GP practice's side of MESH, as a GP system would do it, with NHS England's own client
(PyPI mesh-client); and an independent STU3 check of what arrived (PyPI fhir.resources).

usage: practice.py CONFIG.json COMMAND ...
  receive OUTDIR      read every message in the practice's inbox (oldest first), write each
                      body to OUTDIR/NNN.body (and a letter's PDF to OUTDIR/NNN.pdf) and its
                      MESH headers to OUTDIR/NNN.json, acknowledge it; prints one JSON line
                      per message
  send FILE WORKFLOW  send FILE to our mailbox on WORKFLOW (an acknowledgement); prints the id
  validate FILE...    parse each file as a FHIR STU3 Bundle with fhir.resources (pydantic
                      models of the STU3 specification); prints "N passed, M failed"
CONFIG.json: {"url", "mailbox", "password", "shared_key", "cert", "key", "ca", "to"}
"""
import json
import os
import sys


def client(cfg):
    from mesh_client import MeshClient

    return MeshClient(
        cfg["url"],
        cfg["mailbox"],
        cfg["password"],
        shared_key=cfg["shared_key"].encode(),
        cert=(cfg["cert"], cfg["key"]) if cfg.get("cert") else None,
        verify=cfg.get("ca"),
        max_retries=0,
    )


def receive(cfg, outdir):
    os.makedirs(outdir, exist_ok=True)
    n = len([f for f in os.listdir(outdir) if f.endswith(".json")])
    with client(cfg) as c:
        c.handshake()
        for message_id in c.list_messages():
            msg = c.retrieve_message(message_id)
            body = msg.read()
            headers = {
                "message_id": message_id,
                "workflow_id": msg.workflow_id,
                "local_id": msg.local_id,
                "sender": msg.sender,
                "subject": msg.subject,
                "filename": msg.filename,
                "content_type": msg.content_type,
                "chunks": msg.mex_header("total-chunks"),
                "checksum": msg.checksum,
            }
            msg.close()
            c.acknowledge_message(message_id)
            n += 1
            with open(os.path.join(outdir, f"{n:03}.body"), "wb") as f:
                f.write(body)
            with open(os.path.join(outdir, f"{n:03}.json"), "w") as f:
                json.dump(headers, f)
            pdf = letter_pdf(body)
            if pdf:
                with open(os.path.join(outdir, f"{n:03}.pdf"), "wb") as f:
                    f.write(pdf)
            print(json.dumps(headers), flush=True)


def letter_pdf(body):
    """The PDF inside a GP Connect Send Document message, if it is one."""
    import base64

    try:
        bundle = json.loads(body)
        document = bundle["entry"][2]["resource"]
        for e in document["entry"]:
            if e["resource"]["resourceType"] == "Binary":
                return base64.b64decode(e["resource"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return None


def send(cfg, path, workflow):
    with client(cfg) as c:
        with open(path, "rb") as f:
            data = f.read()
        message_id = c.send_message(
            cfg["to"], data, workflow_id=workflow, content_type="application/fhir+json"
        )
        print(message_id)


def validate(paths):
    from fhir.resources.STU3.bundle import Bundle

    passed = failed = 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                Bundle.model_validate_json(f.read())
            passed += 1
        except Exception as e:  # the validator's own message says what is wrong
            failed += 1
            print(f"not ok - {p}: {e}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and passed > 0 else 1)


if __name__ == "__main__":
    if sys.argv[2] == "validate":
        validate(sys.argv[3:])
    else:
        with open(sys.argv[1]) as f:
            cfg = json.load(f)
        if sys.argv[2] == "receive":
            receive(cfg, sys.argv[3])
        elif sys.argv[2] == "send":
            send(cfg, sys.argv[3], sys.argv[4])
        else:
            sys.exit(f"unknown command {sys.argv[2]}")
