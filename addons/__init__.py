"""edge's mitmproxy addons. `chain.Edge` composes them; `edge.py` is the mitmdump script."""
