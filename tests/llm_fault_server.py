"""A real OpenAI-compatible HTTP server on 127.0.0.1 that injects transport faults (tests only).

It answers `GET /v1/models` and `POST /v1/chat/completions` over real sockets, so the client's
whole stack (openai -> httpx -> TCP) runs. Each chat request takes the next fault from `plan`
(a list, then "ok"), or one drawn with probability `fault_rate`:

- "truncated": HTTP 200 whose JSON body is cut in half (Content-Length matches the cut body)
- "cut":       HTTP 200 announcing the whole body, the connection closed halfway through it
- "empty":     HTTP 200, a well-formed reply whose message content is ""
- "html":      HTTP 200 with a proxy's HTML page instead of JSON
- "500":       HTTP 500 with an error body

Like OpenAI, it enforces structured output: a `response_format` must be
`{"type": "json_schema", "json_schema": {"name": ..., "schema": {"type": "object", "properties": ...}}}`,
else the answer is HTTP 400. `reply(body) -> str` gives the content of a healthy answer.
"""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("truncated", "cut", "empty", "html", "500")


def schema_problem(response_format) -> str | None:
    """Why a response_format would be refused by a server that enforces JSON schemas (None: accepted)."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return "response_format.type must be 'json_schema'"
    js = response_format.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str):
        return "response_format.json_schema must be an object with a name"
    schema = js.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"),
                                                                                        dict):
        got = schema.get("type") if isinstance(schema, dict) else None
        return f"Invalid schema for response_format '{js['name']}': schema must be a JSON Schema of " \
               f"'type: \"object\"', got 'type: \"{got}\"'"
    return None


class FaultServer:
    def __init__(self, reply: Callable[[dict], str], plan: list[str] | None = None, fault_rate: float = 0.0,
                 seed: int = 0, model: str = "fault-test-model"):
        self.reply = reply
        self.plan = list(plan or [])
        self.fault_rate = float(fault_rate)
        self.rng = random.Random(seed)
        self.model = model
        self.requests: list[dict] = []   # every chat request body, in arrival order
        self.sent: list[str] = []        # what each chat request got: "ok" or a fault name
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_fault(self) -> str:
        with self._lock:
            if self.plan:
                return self.plan.pop(0)
            if self.fault_rate and self.rng.random() < self.fault_rate:
                return self.rng.choice(FAULTS)
            return "ok"

    def _completion(self, body: dict, content: str) -> dict:
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
                "model": self.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, data: bytes, ctype: str = "application/json",
                      length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    page = {"object": "list", "data": [{"id": server.model, "object": "model", "created": 0,
                                                        "owned_by": "test"}]}
                    self._send(200, json.dumps(page).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                body = json.loads(raw or b"{}")
                with server._lock:
                    server.requests.append(body)
                if "response_format" in body:
                    problem = schema_problem(body["response_format"])
                    if problem:
                        with server._lock:
                            server.sent.append("schema_refused")
                        self._send(400, json.dumps({"error": {"message": problem, "type": "invalid_request_error",
                                                              "param": "response_format"}}).encode())
                        return
                fault = server._next_fault()
                with server._lock:
                    server.sent.append(fault)
                whole = json.dumps(server._completion(body, "" if fault == "empty" else server.reply(body))).encode()
                if fault == "truncated":
                    self._send(200, whole[: len(whole) // 2])
                elif fault == "cut":
                    self._send(200, whole[: len(whole) // 2], length=len(whole))
                    self.close_connection = True
                elif fault == "html":
                    self._send(200, b"<html><body>502 Bad Gateway (proxy)</body></html>", ctype="text/html")
                elif fault == "500":
                    self._send(500, b'{"error": {"message": "internal error"}}')
                else:  # "ok" and "empty"
                    self._send(200, whole)

        return Handler
