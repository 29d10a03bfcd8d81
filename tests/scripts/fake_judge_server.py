"""A stand-in judge server, as a process a test can SIGKILL: it answers `/health`, `/v1/models` and
`/v1/chat/completions` like vLLM, with first-token log-probs for "yes" / "no" whose odds follow a hash
of the request (so scores differ between samples and repeat for the same request).

    python tests/scripts/fake_judge_server.py PORT     # prints "ready" once it listens on 127.0.0.1:PORT
"""

import hashlib
import json
import math
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"data": [{"id": "fake-judge"}]} if self.path == "/v1/models" else {})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        p_yes = 0.05 + 0.9 * hashlib.sha256(body).digest()[0] / 255
        top = [{"token": "yes", "logprob": math.log(p_yes)}, {"token": "no", "logprob": math.log(1 - p_yes)}]
        first = {"token": "yes", "logprob": top[0]["logprob"], "top_logprobs": top}
        message = {"role": "assistant", "content": "yes"}
        self._send({"choices": [{"index": 0, "message": message, "logprobs": {"content": [first]}}]})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    server.serve_forever()
