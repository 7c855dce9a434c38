"""The chain container's health: its JSON-RPC answers eth_chainId (stdlib only)."""

import json
import sys
import urllib.request

req = urllib.request.Request(
    "http://127.0.0.1:8545",
    data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode(),
    headers={"Content-Type": "application/json"},
)
try:
    with urllib.request.urlopen(req, timeout=2) as resp:
        sys.exit(0 if "result" in json.load(resp) else 1)
except OSError as exc:
    print(f"JSON-RPC does not answer: {exc}")
    sys.exit(1)
