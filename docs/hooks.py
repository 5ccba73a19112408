"""MkDocs hooks: the CLI and HTTP references are generated at build time from the code (the argparse parser and the
service's OpenAPI schema), so they cannot drift from it. A page holds a marker (`<!-- cli-reference -->`,
`<!-- http-reference -->`) where the generated text goes."""

from __future__ import annotations

import argparse
import json
import tempfile


def cli_reference() -> str:
    """Every command of `vidfusion`, with its usage and options, from the parser the CLI runs."""
    from vidfusion.cli.args import build_parser

    parser = build_parser()
    out = ["## vidfusion", "", "```text", parser.format_help().strip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [f"## vidfusion {name}", "", "```text", sub.format_help().strip(), "```", ""]
    return "\n".join(out)


def http_reference() -> str:
    """Every operation of the service: method, path, summary, parameters, request body, responses."""
    from vidfusion.serve.app import create_app
    from vidfusion.serve.jobs import JobStore
    from vidfusion.serve.params import ServeSettings

    with tempfile.TemporaryDirectory() as folder:
        store = JobStore(folder)
        schema = create_app(store, [], ServeSettings()).openapi()
        store.close()
    out = ["The schema itself: `GET /openapi.json` on a running server (interactive: `/docs`). Limits shown are the "
           "defaults (`--max-frames 128`, `--max-pixels 1048576`); a server states its own.", ""]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            out += [f"## {method.upper()} `{path}`", "", (op.get("description") or op.get("summary") or "").strip(),
                    ""]
            params = [p for p in op.get("parameters", [])]
            if params:
                out += ["| parameter | in | required |", "|---|---|---|"]
                out += [f"| `{p['name']}` | {p['in']} | {p.get('required', False)} |" for p in params] + [""]
            body = op.get("requestBody", {}).get("content", {})
            for kind, content in body.items():
                ref = content["schema"].get("$ref", "").split("/")[-1]
                fields = schema["components"]["schemas"].get(ref, {}).get("properties", {})
                out += [f"Body ({kind}):", "", "| field | type | constraints |", "|---|---|---|"]
                for name, spec in fields.items():
                    kinds = spec.get("type") or "/".join(a.get("type", "object") for a in spec.get("anyOf", []))
                    limits = {k: v for k, v in spec.items() if k in ("minimum", "maximum", "maxLength", "minLength",
                                                                      "multipleOf", "enum", "default")}
                    out.append(f"| `{name}` | {kinds} | {json.dumps(limits) if limits else ''} |")
                out.append("")
            out += ["| status | meaning |", "|---|---|"]
            out += [f"| {code} | {r.get('description', '')} |" for code, r in op["responses"].items()] + [""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    if "<!-- http-reference -->" in markdown:
        markdown = markdown.replace("<!-- http-reference -->", http_reference())
    return markdown
