"""Push the task images to a registry and pin them by digest: `make image-push REGISTRY=registry.example.com/team`.

    python tools/push_images.py --registry REG --tag TAG --image LOCAL_CPU [--gpu-image LOCAL_GPU] [-o build/images.json]

Tags each local image as REG/ch11-pipeline:TAG (and :TAG-gpu), pushes it, reads the digest the registry gave it, and
writes build/images.json ({"image": "REG/ch11-pipeline@sha256:...", "gpu_image": ...}), which
`python pipeline.py compile --images build/images.json` reads: every task then runs exactly the pushed bytes,
whatever is pushed to the tag later. Without --gpu-image the GPU entry keeps the tag of params.yaml's
kubeflow.gpu_image unless the file already pins one (push the GPU image where you build it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def docker(*args: str) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"image-push: `docker {' '.join(args)}` failed:\n{proc.stderr.strip()}\n"
                         "Is the image built (make image / make image-gpu) and are you logged in (docker login REGISTRY)?")
    return proc.stdout.strip()


def push(local: str, remote: str) -> str:
    """Tag, push; the pushed image's reference by digest (REPO@sha256:...)."""
    docker("tag", local, remote)
    print(f"==> pushing {remote}", file=sys.stderr)
    docker("push", remote)
    repo = remote.rsplit(":", 1)[0]
    digests = docker("image", "inspect", "--format", "{{range .RepoDigests}}{{println .}}{{end}}", remote).split()
    pinned = [d for d in digests if d.startswith(repo + "@sha256:")]
    if not pinned:
        raise SystemExit(f"image-push: the registry gave {remote} no digest (RepoDigests: {digests})")
    return pinned[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", required=True, help="e.g. registry.example.com/team (the images go to REGISTRY/ch11-pipeline)")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--image", required=True, help="the local CPU image (make image-name)")
    ap.add_argument("--gpu-image", default=None, help="the local GPU image (make image-gpu)")
    ap.add_argument("-o", "--output", default="build/images.json")
    args = ap.parse_args(argv)

    repo = f"{args.registry.rstrip('/')}/ch11-pipeline"
    out = Path(args.output)
    pinned = json.loads(out.read_text()) if out.is_file() else {}
    pinned["image"] = push(args.image, f"{repo}:{args.tag}")
    if args.gpu_image:
        pinned["gpu_image"] = push(args.gpu_image, f"{repo}:{args.tag}-gpu")
    elif "gpu_image" not in pinned:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from components.config import load_params

        pinned["gpu_image"] = load_params(Path("params.yaml")).kubeflow.gpu_image
        print(f"==> no GPU image pushed: {out} keeps {pinned['gpu_image']} for the training tasks", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(pinned, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)
    print(f"==> {out}: {pinned['image']}, {pinned['gpu_image']}\n"
          f"    compile with: python pipeline.py compile --images {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
