"""Does every pin of requirements.lock have a wheel for the microscope PC
(Windows, x86-64, CPython 3.11)? Asks pip itself, one package at a time:

    python scripts/check_windows_wheels.py [--lock requirements.lock] [--python-version 3.11.9]

For each pin: ``pip download --only-binary=:all: --platform win_amd64
--python-version 3.11 --implementation cp --no-deps`` into a temporary folder
(torch from the PyTorch CPU index, as scripts/setup_env.sh installs it, else
from PyPI, whose Windows wheel is the CPU build).
A pure-Python wheel (py3-none-any) counts as OK; a pin with no wheel but a
source distribution is SDIST (pip builds it there). Prints OK/SDIST/MISSING per pin,
then the dependencies that only Windows pulls in (Requires-Dist with a
Windows marker, read from the downloaded wheels) and that the lock does not
pin, then a summary. Exit status 1 when a pin has no wheel.
Needs network access to PyPI and download.pytorch.org.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def windows_environment(python_version: str) -> dict:
    """The marker environment of CPython ``python_version`` on 64-bit Windows."""
    env = dict(default_environment())
    env.update(sys_platform="win32", os_name="nt", platform_system="Windows", platform_machine="AMD64",
               platform_python_implementation="CPython", implementation_name="cpython",
               python_version=".".join(python_version.split(".")[:2]), python_full_version=python_version,
               implementation_version=python_version)
    return env


def read_pins(lock: Path, env: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, version) of every ``name==version`` line whose marker (if any)
    holds on Windows, and the lines left out for their marker; any other line
    is refused with its line number."""
    pins, skipped = [], []
    for n, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise SystemExit(f"{lock}:{n}: not a requirement: {line!r} ({e})") from None
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or req.url or req.extras:
            raise SystemExit(f"{lock}:{n}: not a 'name==version' pin: {line!r}")
        if req.marker is not None and not req.marker.evaluate(dict(env, extra="")):
            skipped.append(line)
            continue
        pins.append((req.name, spec[0].version))
    return pins, skipped


def download(name: str, version: str, dest: Path, python_version: str) -> tuple[bool, str]:
    """(found, the wheel's file name or pip's last error line)."""
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
           "--only-binary=:all:", "--platform", "win_amd64", "--python-version", python_version,
           "--implementation", "cp", "-d", str(dest)]
    if canonicalize_name(name) == "torch":     # the CPU build, as setup_env.sh installs it
        r = subprocess.run(cmd + ["--retries", "1", "--index-url", TORCH_INDEX, f"torch=={version}+cpu"], capture_output=True, text=True)
        wheels = sorted(dest.glob("*.whl"))
        if r.returncode == 0 and wheels:
            return True, wheels[0].name + "  (CPU index)"
    r = subprocess.run(cmd + [f"{name}=={version}"], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode == 0 and wheels:
        return True, wheels[0].name
    lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    why = lines[-1].strip() if lines else f"pip exited {r.returncode}"
    have = re.search(r"\(from versions: ([^)]*)\)", r.stderr or "")
    if have:                                    # what the platform does have: the fix is often a marker pin
        versions = [v.strip() for v in have.group(1).split(",") if v.strip()]
        why += f"; win_amd64 wheels exist for: {', '.join(versions[-5:]) or 'none'}"
    skipped = re.search(r"Ignored the following versions that require a different python version: ([^\n]*)",
                        r.stderr or "")
    if skipped:
        why += f"; skipped for Requires-Python: {skipped.group(1)[:200]}"
    return False, why


def has_sdist(name: str, version: str, dest: Path) -> bool:
    """Whether the pin exists as a source distribution only (pip builds it on
    the target; fine for a pure-Python package, a compiler job otherwise)."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--no-binary=:all:", "--no-build-isolation", "-d", str(dest), f"{name}=={version}"],
                       capture_output=True, text=True)
    return r.returncode == 0


def windows_only_requirements(wheel: Path, env: dict) -> list[Requirement]:
    """Requires-Dist of ``wheel`` whose marker holds on Windows but not on Linux
    (extras are left out: the lock installs none)."""
    linux = dict(env, sys_platform="linux", os_name="posix", platform_system="Linux", platform_machine="x86_64")
    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(meta).decode("utf-8", "replace") if meta else ""
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        try:
            req = Requirement(line.split(":", 1)[1].strip())
        except InvalidRequirement:
            continue
        if req.marker is None:
            continue
        win = req.marker.evaluate(dict(env, extra=""))
        if win and not req.marker.evaluate(dict(linux, extra="")):
            out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    # a patch release: pip reads "3.11" as 3.11.0, which a Requires-Python of ">3.11" refuses
    ap.add_argument("--python-version", default="3.11.9")
    args = ap.parse_args(argv)
    env = windows_environment(args.python_version)
    pins, not_windows = read_pins(args.lock, env)
    pinned = {canonicalize_name(n) for n, _ in pins}
    missing, sdist, extra = [], [], {}
    print(f"wheels for win_amd64 / CPython {args.python_version}, {len(pins)} pins of {args.lock.name}"
          + (f" ({len(not_windows)} left out by their marker: {'; '.join(not_windows)})" if not_windows else ""))
    with tempfile.TemporaryDirectory(prefix="winwheels-") as tmp:
        for i, (name, version) in enumerate(pins):
            dest = Path(tmp) / str(i)
            ok, what = download(name, version, dest, args.python_version)
            if not ok and has_sdist(name, version, dest):
                print(f"SDIST   {name}=={version}  no wheel; sdist only: pip builds it on Windows "
                      "(check it is pure Python)", flush=True)
                sdist.append(f"{name}=={version}")
                continue
            print(f"{'OK     ' if ok else 'MISSING'} {name}=={version}  {what}", flush=True)
            if not ok:
                missing.append(f"{name}=={version}")
                continue
            for req in windows_only_requirements(dest / what.split()[0], env):
                if canonicalize_name(req.name) not in pinned:
                    extra.setdefault(str(req), set()).add(name)
            for f in dest.iterdir():            # keep the disk use to one wheel at a time
                f.unlink()
    if extra:
        print("\nrequired only on Windows and not pinned in the lock (pip resolves them there):")
        for req, by in sorted(extra.items()):
            print(f"  {req}    (by {', '.join(sorted(by))})")
    print(f"\nsummary: {len(pins) - len(missing) - len(sdist)} OK, {len(sdist)} SDIST only"
          + (f" ({', '.join(sdist)})" if sdist else "")
          + f", {len(missing)} MISSING of {len(pins)}" + (": " + ", ".join(missing) if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
