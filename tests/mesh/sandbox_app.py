"""NHS England's MESH sandbox (PyPI mesh-sandbox) with its mailbox and workflow files read
from the directory in MESH_SANDBOX_CONFIG_DIR, written by the test (the sandbox itself always
reads the copies inside its package). Run: uvicorn sandbox_app:app --app-dir tests/mesh"""
import os

from mesh_sandbox.store.canned_store import CannedStore

_initialise = CannedStore.initialise


def _initialise_from_test_config(self):
    self._canned_data_dir = os.environ["MESH_SANDBOX_CONFIG_DIR"]
    _initialise(self)


CannedStore.initialise = _initialise_from_test_config

from mesh_sandbox.api import app  # noqa: E402,F401

# Faults the test injects into the real sandbox, by files in the config directory:
#   fail-sends: N      the next N sends (POST .../outbox) answer 503 and store nothing
#   hold-sends: SECS   a message's last chunk is accepted and stored (the message is
#                      complete and delivered), then the answer is held for SECS (the sender
#                      cannot know it got through: a crash or timeout window)
import asyncio  # noqa: E402

from fastapi.responses import JSONResponse  # noqa: E402


def _read(name):
    path = os.path.join(os.environ["MESH_SANDBOX_CONFIG_DIR"], name)
    try:
        with open(path) as f:
            return path, f.read().strip()
    except FileNotFoundError:
        return path, None


@app.middleware("http")
async def injected_faults(request, call_next):
    is_send = request.method == "POST" and request.url.path.endswith("/outbox")
    if is_send:
        path, n = _read("fail-sends")
        if n and int(n) > 0:
            with open(path, "w") as f:
                f.write(str(int(n) - 1))
            return JSONResponse(status_code=503, content={"message": "injected fault"})
    response = await call_next(request)
    chunk = request.headers.get("mex-chunk-range", "1:1").split(":")
    is_last_chunk = (
        request.method == "POST" and "/outbox" in request.url.path and chunk[0] == chunk[-1]
    )
    if is_last_chunk:
        _, secs = _read("hold-sends")
        if secs:
            await asyncio.sleep(float(secs))
    return response
