#!/usr/bin/env bash
# steerserve with curl: health, models, a completion, a steered chat, a streamed /generate.
#   bash clients/examples/curl.sh --base-url http://localhost:8000 [--api-key KEY] [--sae ID --feature N]
set -euo pipefail

BASE_URL=http://localhost:8000 API_KEY=none SAE="" FEATURE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --base-url) BASE_URL=$2; shift 2 ;;
    --api-key) API_KEY=$2; shift 2 ;;
    --sae) SAE=$2; shift 2 ;;
    --feature) FEATURE=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
BASE_URL=${BASE_URL%/}
post() { curl -sS --fail-with-body -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' "$@"; }

echo "== health";      curl -sS --fail-with-body "$BASE_URL/health"; echo
echo "== models";      curl -sS --fail-with-body -H "Authorization: Bearer $API_KEY" "$BASE_URL/v1/models"; echo
echo "== completion"
post "$BASE_URL/v1/completions" -d '{"prompt": "The weather in California is", "max_tokens": 8, "temperature": 0}'
echo
if [ -n "$SAE" ]; then
  echo "== steered chat (feature $FEATURE of $SAE, with the unsteered twin)"
  post "$BASE_URL/v1/chat/completions" -d '{
    "messages": [{"role": "user", "content": "How is the weather?"}], "max_tokens": 8, "temperature": 0,
    "steering": [{"feature": {"sae": "'"$SAE"'", "index": '"$FEATURE"'}, "mode": "add", "strength": 8, "scale": "unit"}],
    "return_unsteered": true}'
  echo
fi
echo "== streamed /generate (server-sent events)"
post -N "$BASE_URL/generate" -d '{"prompt": "Once upon a time", "max_tokens": 4, "stream": true}'
