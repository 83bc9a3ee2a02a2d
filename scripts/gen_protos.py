"""Regenerates src/dedup/_proto/ from protos/ (Python modules, gRPC stubs and .pyi stubs).

The generated code is checked in, so that `pip install .`, a wheel or a `git+` URL give a
working package without grpcio-tools in the build. `--check` regenerates into a temporary
directory and fails on any difference from the checked-in files (`make lint`, so CI).

protoc writes imports as the proto path (`from dedup.v1 import ...`); they are
rewritten to live under the private `dedup._proto` package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src" / "dedup" / "_proto"
IMPORT = re.compile(r"^from dedup\.(v\d+) import", re.MULTILINE)


def generate(out: Path) -> int:
    """Writes the generated tree into `out`; returns how many .proto files it compiled."""
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if (out / "dedup").exists():
        shutil.rmtree(out / "dedup")
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    plugins = Path(sys.executable).parent
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *protos,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = IMPORT.sub(r"from dedup._proto.dedup.\1 import", text)
        if fixed != text:
            path.write_text(fixed)
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return len(protos)


def differences(left: Path, right: Path) -> list[str]:
    """Files that differ, or exist on one side only, between two generated trees."""
    names = {p.relative_to(left) for p in left.rglob("*.py*")} | \
        {p.relative_to(right) for p in right.rglob("*.py*")}
    return sorted(str(name) for name in names
                  if not ((left / name).exists() and (right / name).exists()
                          and filecmp.cmp(left / name, right / name, shallow=False)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="fail if the checked-in code differs from freshly generated code")
    args = parser.parse_args()
    if not args.check:
        count = generate(OUT)
        print(f"generated {count} proto file(s) into {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / "_proto"
        generate(fresh)
        stale = differences(fresh, OUT)
    if stale:
        print("src/dedup/_proto is not what protos/ generates; run `make protos` and commit:\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    print("src/dedup/_proto matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
