"""A faulty network in front of a real OpenAI-compatible server, for the server-engine tests.

Forwards every request to --upstream and, as asked:
  --fault-rate F       answers a share F of requests with 429 or 503, or cuts the connection
                       without an answer (a third each), seeded by --seed;
  --exit-after N       exits (the server goes down) once N completions have been forwarded;
  --refuse-token-ids   answers 400 to a completion whose prompt is a list of token ids, as a
                       server without token-id prompts does;
  --log FILE           appends one JSON line per request: path, the Authorization header, and
                       whether it was faulted.
Prints the port it listens on (--port 0 picks a free one) as its first line.
"""
import argparse, json, os, random, socket, sys, threading, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--upstream", required=True)
p.add_argument("--port", type=int, default=0)
p.add_argument("--fault-rate", type=float, default=0.0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--exit-after", type=int, default=0)
p.add_argument("--refuse-token-ids", action="store_true")
p.add_argument("--log")
args = p.parse_args()
rng = random.Random(args.seed)
lock = threading.Lock()
forwarded = 0


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_one(self, method):
        global forwarded
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        completion = self.path.endswith("/completions")
        with lock:
            fault = rng.choice(["429", "503", "cut"]) if completion and rng.random() < args.fault_rate else None
        if args.log:
            with lock, open(args.log, "a") as log:
                log.write(json.dumps({"path": self.path, "authorization": self.headers.get("authorization"), "fault": fault}) + "\n")
        if fault == "cut":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if fault:
            self.answer(int(fault), {"error": {"message": f"injected {fault}"}})
            return
        if args.refuse_token_ids and completion and isinstance(json.loads(body).get("prompt"), list):
            self.answer(400, {"error": {"message": "prompt must be a string"}})
            return
        request = urllib.request.Request(args.upstream.rstrip("/") + self.path, data=body, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if completion and status == 200:
            with lock:
                forwarded += 1
                if args.exit_after and forwarded >= args.exit_after:
                    self.wfile.flush()
                    os._exit(0)

    def do_GET(self):
        self.handle_one("GET")

    def do_POST(self):
        self.handle_one("POST")


server = ThreadingHTTPServer(("127.0.0.1", args.port), Proxy)
print(server.server_address[1], flush=True)
server.serve_forever()
