"""A stand-in for the Hugging Face Hub's download API, for tests/train.rs.

Serves every repository under ROOT the way huggingface.co does, models from ROOT/org/name/ and
datasets from ROOT/datasets/org/name/:
  GET /api/models/{org}/{name}                   -> {"id", "sha", "siblings": [{"rfilename"}]}
  GET /{org}/{name}/resolve/{revision}/{file}    -> the file's bytes
  GET /api/datasets/{org}/{name}, GET /datasets/{org}/{name}/resolve/{revision}/{file}: the same
Anything else is 404. With --token T, requests without "Authorization: Bearer T" get 401.
Prints "PORT <n>" on stdout once it listens, then serves until killed. Every request path is
appended to ROOT/requests.log so a test can tell what was fetched.

usage: fake_hub.py ROOT [--token T]
"""

import hashlib
import http.server
import json
import os
import sys


def main():
    root = os.path.abspath(sys.argv[1])
    token = sys.argv[sys.argv.index("--token") + 1] if "--token" in sys.argv else None

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status, body, kind="application/octet-stream"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def repo_dir(self, *parts):
            path = os.path.join(root, *parts)
            return path if os.path.isdir(path) else None

        def do_GET(self):
            with open(os.path.join(root, "requests.log"), "a") as log:
                log.write(self.path + "\n")
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                return self.send(401, b'{"error": "unauthorized"}', "application/json")
            parts = self.path.split("?")[0].strip("/").split("/")
            base = []
            if parts[:2] == ["api", "datasets"] or parts[:1] == ["datasets"]:
                base = ["datasets"]
                parts = ["api", "models"] + parts[2:] if parts[0] == "api" else parts[1:]
            if parts[:2] == ["api", "models"] and len(parts) == 4:
                repo = self.repo_dir(*base, parts[2], parts[3])
                if repo is None:
                    return self.send(404, b'{"error": "not found"}', "application/json")
                files = sorted(
                    os.path.relpath(os.path.join(d, f), repo)
                    for d, _, names in os.walk(repo)
                    for f in names
                )
                sha = hashlib.sha1("\n".join(files).encode()).hexdigest()
                body = {
                    "id": f"{parts[2]}/{parts[3]}",
                    "sha": sha,
                    "siblings": [{"rfilename": f} for f in files],
                }
                return self.send(200, json.dumps(body).encode(), "application/json")
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = self.repo_dir(*base, parts[0], parts[1])
                file = os.path.join(repo, *parts[4:]) if repo else None
                if file and ".." not in parts and os.path.isfile(file):
                    with open(file, "rb") as f:
                        return self.send(200, f.read())
            return self.send(404, b"not found", "text/plain")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
