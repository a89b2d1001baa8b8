"""A stand-in for the Kelpie API's job endpoints, for tests/kelpie_api.rs.

  POST /jobs        -> 200 {"id", "status": "pending", ...the posted job}
  GET /jobs/{id}    -> 200 the job, 404 {"error"} if unknown
  DELETE /jobs/{id} -> 200 the job with "status": "canceled"
Every request must carry Salad-Api-Key: KEY, Salad-Organization: ORG and Salad-Project: PROJECT,
else 401 {"error": "..."} (which never repeats the key). Prints "PORT <n>" once it listens.

usage: fake_kelpie.py KEY ORG PROJECT
"""

import http.server
import json
import sys
import uuid


def main():
    key, org, project = sys.argv[1:4]
    jobs = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status, value):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def authorised(self):
            wanted = {"Salad-Api-Key": key, "Salad-Organization": org, "Salad-Project": project}
            wrong = [h for h, v in wanted.items() if self.headers.get(h) != v]
            if wrong:
                self.send(401, {"error": "Unauthorized: bad " + ", ".join(wrong)})
            return not wrong

        def job_id(self):
            parts = self.path.strip("/").split("/")
            return parts[1] if len(parts) == 2 and parts[0] == "jobs" else None

        def do_POST(self):
            if not self.authorised():
                return
            if self.path.rstrip("/") != "/jobs":
                return self.send(404, {"error": "Not Found"})
            length = int(self.headers.get("Content-Length", 0))
            try:
                job = json.loads(self.rfile.read(length))
            except ValueError:
                return self.send(400, {"error": "body is not JSON"})
            for field in ["command", "arguments", "container_group_id"]:
                if field not in job:
                    return self.send(400, {"error": f"missing {field}"})
            job_id = str(uuid.uuid4())
            jobs[job_id] = dict(job, id=job_id, status="pending")
            self.send(200, jobs[job_id])

        def do_GET(self):
            if not self.authorised():
                return
            job_id = self.job_id()
            if job_id not in jobs:
                return self.send(404, {"error": "Job not found"})
            self.send(200, jobs[job_id])

        def do_DELETE(self):
            if not self.authorised():
                return
            job_id = self.job_id()
            if job_id not in jobs:
                return self.send(404, {"error": "Job not found"})
            jobs[job_id]["status"] = "canceled"
            self.send(200, jobs[job_id])

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
