"""Regenerates src/dedup/_proto/ from protos/ (Python modules, gRPC stubs and .pyi stubs).

protoc writes imports as the proto path (`from dedup.v1 import ...`); they are
rewritten to live under the private `dedup._proto` package.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src" / "dedup" / "_proto"
IMPORT = re.compile(r"^from dedup\.(v\d+) import", re.MULTILINE)


def main() -> int:
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if (OUT / "dedup").exists():
        shutil.rmtree(OUT / "dedup")
    OUT.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    plugins = Path(sys.executable).parent
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            f"--mypy_out={OUT}",
            f"--mypy_grpc_out={OUT}",
            *protos,
        ]
    )
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        fixed = IMPORT.sub(r"from dedup._proto.dedup.\1 import", text)
        if fixed != text:
            path.write_text(fixed)
    for folder in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    print(f"generated {len(protos)} proto file(s) into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
