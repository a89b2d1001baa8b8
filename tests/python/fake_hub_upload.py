#!/usr/bin/env python3
"""A local stand-in for the Hugging Face Hub's upload endpoints, for ferrotune's push tests
(tests/python/fake_hub.py serves the download side).

Usage: fake_hub_upload.py STORE_DIR TOKEN LFS_THRESHOLD MULTIPART_CHUNK

Prints "PORT <n>" on stdout once listening on 127.0.0.1. Implements only what an upload needs:
- POST /api/repos/create                         (409 if the repo exists)
- POST /api/models/{repo}/preupload/{rev}        (files >= LFS_THRESHOLD bytes are "lfs")
- POST /{repo}.git/info/lfs/objects/batch        (git-lfs batch API; objects larger than
                                                   MULTIPART_CHUNK get a multipart action)
- PUT  /_storage/{oid}, /_storage/{oid}/{part}   (the "presigned" storage URLs: served under
                                                   http://localhost:PORT, another origin than
                                                   the endpoint http://127.0.0.1:PORT; they
                                                   must NOT receive the token)
- POST /_complete/{oid}                          (multipart completion: parts + ETags)
- POST /{repo}.git/info/lfs/verify
- POST /api/models/{repo}/commit/{rev}           (ndjson: header, file (base64), lfsFile)
Every Hub endpoint checks "Authorization: Bearer TOKEN". Committed files are written to
STORE_DIR/repos/{repo}/{path}; every request is appended to STORE_DIR/requests.jsonl as
{"method", "path", "auth"} so tests can check the flow.
"""
import base64
import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STORE = Path(sys.argv[1])
TOKEN = sys.argv[2]
LFS_THRESHOLD = int(sys.argv[3])
CHUNK = int(sys.argv[4])
LOCK = threading.Lock()
REPO = r"(?P<repo>[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)?)"


class Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def reply(self, status, obj=None, headers=()):
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def record(self):
        with LOCK, open(STORE / "requests.jsonl", "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "auth": self.headers.get("Authorization") is not None}) + "\n")

    def authorized(self):
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.reply(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def origin(self):
        return f"http://127.0.0.1:{self.server.server_port}"

    def storage(self):
        return f"http://localhost:{self.server.server_port}"

    def do_PUT(self):
        self.record()
        data = self.body()
        if self.headers.get("Authorization") is not None:
            return self.reply(400, {"error": "the Hub token was sent to a storage URL"})
        m = re.fullmatch(r"/_storage/([0-9a-f]{64})(?:/(\d+))?", self.path)
        if not m:
            return self.reply(404, {"error": "no such storage URL"})
        oid, part = m.groups()
        blobs = STORE / "blobs"
        blobs.mkdir(exist_ok=True)
        if part is None:
            if hashlib.sha256(data).hexdigest() != oid:
                return self.reply(400, {"error": "sha256 mismatch"})
            (blobs / oid).write_bytes(data)
            return self.reply(200)
        (blobs / f"{oid}.part{int(part)}").write_bytes(data)
        return self.reply(200, headers=[("ETag", '"' + hashlib.md5(data).hexdigest() + '"')])

    def do_POST(self):
        self.record()
        data = self.body()
        if not self.authorized():
            return
        path = self.path
        if path == "/api/repos/create":
            req = json.loads(data)
            repo = req["name"] if not req.get("organization") else f"{req['organization']}/{req['name']}"
            d = STORE / "repos" / repo
            if d.exists():
                return self.reply(409, {"error": "You already created this model repo"})
            d.mkdir(parents=True)
            return self.reply(200, {"url": f"{self.origin()}/{repo}"})
        m = re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path)
        if m:
            if not (STORE / "repos" / m["repo"]).is_dir():
                return self.reply(404, {"error": "Repository not found"})
            files = []
            for f in json.loads(data)["files"]:
                if len(base64.b64decode(f["sample"])) > 512:
                    return self.reply(400, {"error": "sample too long"})
                mode = "lfs" if f["size"] >= LFS_THRESHOLD else "regular"
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
            return self.reply(200, {"files": files})
        m = re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path)
        if m:
            if "application/vnd.git-lfs+json" not in (self.headers.get("Content-Type") or ""):
                return self.reply(415, {"error": "LFS batch needs application/vnd.git-lfs+json"})
            req = json.loads(data)
            assert req["operation"] == "upload" and req["hash_algo"] == "sha256", req
            objects = []
            for o in req["objects"]:
                oid, size = o["oid"], o["size"]
                entry = {"oid": oid, "size": size, "authenticated": True}
                if not (STORE / "blobs" / oid).exists():
                    verify = {"href": f"{self.origin()}/{m['repo']}.git/info/lfs/verify", "header": {}}
                    if size > CHUNK:
                        n = -(-size // CHUNK)
                        header = {"chunk_size": str(CHUNK)}
                        for i in range(1, n + 1):
                            header[f"{i:05d}"] = f"{self.storage()}/_storage/{oid}/{i}"
                        upload = {"href": f"{self.origin()}/_complete/{oid}", "header": header}
                    else:
                        upload = {"href": f"{self.storage()}/_storage/{oid}", "header": {}}
                    entry["actions"] = {"upload": upload, "verify": verify}
                objects.append(entry)
            return self.reply(200, {"transfer": "basic", "objects": objects})
        m = re.fullmatch(r"/_complete/([0-9a-f]{64})", path)
        if m:
            oid = m[1]
            req = json.loads(data)
            blobs = STORE / "blobs"
            whole = b""
            for i, p in enumerate(req["parts"], start=1):
                part = (blobs / f"{oid}.part{p['partNumber']}").read_bytes()
                if p["partNumber"] != i or p["etag"] != '"' + hashlib.md5(part).hexdigest() + '"':
                    return self.reply(400, {"error": f"bad part {p}"})
                whole += part
            if hashlib.sha256(whole).hexdigest() != oid or req["oid"] != oid:
                return self.reply(400, {"error": "assembled object does not match its oid"})
            (blobs / oid).write_bytes(whole)
            return self.reply(200)
        m = re.fullmatch(rf"/{REPO}\.git/info/lfs/verify", path)
        if m:
            req = json.loads(data)
            blob = STORE / "blobs" / req["oid"]
            if not blob.exists() or blob.stat().st_size != req["size"]:
                return self.reply(404, {"error": "object not uploaded"})
            return self.reply(200)
        m = re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path)
        if m:
            if self.headers.get("Content-Type") != "application/x-ndjson":
                return self.reply(415, {"error": "commit needs application/x-ndjson"})
            repo_dir = STORE / "repos" / m["repo"]
            if not repo_dir.is_dir():
                return self.reply(404, {"error": "Repository not found"})
            lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header" or not lines[0]["value"]["summary"]:
                return self.reply(400, {"error": "the first line must be the header with a summary"})
            for line in lines[1:]:
                v = line["value"]
                dest = repo_dir / v["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                if line["key"] == "file":
                    assert v["encoding"] == "base64"
                    dest.write_bytes(base64.b64decode(v["content"]))
                elif line["key"] == "lfsFile":
                    blob = STORE / "blobs" / v["oid"]
                    if v["algo"] != "sha256" or not blob.exists() or blob.stat().st_size != v["size"]:
                        return self.reply(400, {"error": f"LFS object {v['oid']} was not uploaded"})
                    dest.write_bytes(blob.read_bytes())
                else:
                    return self.reply(400, {"error": f"unknown commit line {line['key']}"})
            with open(STORE / "commits.jsonl", "a") as f:
                f.write(json.dumps({"repo": m["repo"], "rev": m["rev"], "summary": lines[0]["value"]["summary"],
                                    "files": len(lines) - 1}) + "\n")
            oid = hashlib.sha1(data).hexdigest()
            return self.reply(200, {"commitUrl": f"{self.origin()}/{m['repo']}/commit/{oid}", "commitOid": oid})
        return self.reply(404, {"error": f"no route {path}"})


def main():
    STORE.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


main()
