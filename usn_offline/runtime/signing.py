"""Bundle signatures: Ed25519 over manifest.json (torch-free).

The manifest lists every file of the bundle with its SHA-256 (the model, the
certificate, the engine), so one signature over its exact bytes covers them all: whoever
can write the bundle but does not hold the private key cannot widen the certified
region, change δ or swap the model and re-hash the manifest without the signature
failing. The signature lives beside the manifest in ``manifest.sig`` (JSON: the key id,
the algorithm and the base64 signature); it is not listed in the manifest it signs.

Keys are files: a private key in PEM (PKCS#8, written 0600 by :func:`generate_key`) and
its public key in PEM (``<key>.pub``). The key id is the SHA-256 of the raw public key,
so a node's log and a signature name the same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from usn_offline.errors import BundleError, ConfigError
from usn_offline.jsonio import loads_strict

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # an optional dependency on a minimal robot install
        raise ConfigError("bundle signatures need the 'cryptography' package (pip install cryptography)") from exc
    return ed25519, serialization, InvalidSignature


def key_id(public_key) -> str:
    """SHA-256 (hex) of the raw 32-byte public key."""
    _, serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key(out: Path | str) -> tuple[Path, Path]:
    """Write a new private key to ``out`` (PEM, mode 0600) and its public key to
    ``out.pub``; refuses to overwrite either."""
    ed25519, serialization, _ = _crypto()
    private_path, public_path = Path(out), Path(f"{out}.pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists: keys are never overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _load_key(path: Path | str, private: bool, missing: str):
    """An Ed25519 key from a PEM file; ConfigError naming the file and what is wrong."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{missing}: {path}")
    text = path.read_bytes()
    try:
        key = (serialization.load_pem_private_key(text, password=None) if private
               else serialization.load_pem_public_key(text))
    except (ValueError, TypeError) as exc:
        what = "an unencrypted PEM private key" if private else "a PEM public key"
        raise ConfigError(f"{path}: not {what} ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 {'key (usn-offline keygen makes one)' if private else 'public key'}")
    return key


def load_private_key(path: Path | str):
    return _load_key(path, True, "signing key not found")


def load_public_key(path: Path | str):
    return _load_key(path, False, "trusted key not found")


def sign_manifest(bundle_dir: Path | str, private_key_path: Path | str) -> str:
    """Sign ``bundle_dir/manifest.json`` and write ``manifest.sig``; returns the key id."""
    key = load_private_key(private_key_path)
    root = Path(bundle_dir)
    signature = key.sign((root / "manifest.json").read_bytes())
    kid = key_id(key.public_key())
    (root / SIGNATURE).write_text(json.dumps({"algorithm": ALGORITHM, "key_id": kid,
                                              "signature": base64.b64encode(signature).decode()}, indent=1))
    return kid


def read_signature(bundle_dir: Path | str) -> tuple[str, bytes]:
    """(key id, signature bytes) of ``bundle_dir/manifest.sig``, unchecked; BundleError (one
    line) for a missing or malformed signature file."""
    sig_path = Path(bundle_dir) / SIGNATURE
    try:
        doc = loads_strict(sig_path.read_text())
        signature = base64.b64decode(doc["signature"], validate=True)
        kid, algorithm = doc["key_id"], doc["algorithm"]
    except OSError as exc:
        raise BundleError(f"{sig_path}: cannot read it ({exc.strerror or type(exc).__name__})") from exc
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BundleError(f"{sig_path}: not a valid signature file ({type(exc).__name__})") from exc
    if not isinstance(kid, str) or not isinstance(algorithm, str):
        raise BundleError(f"{sig_path}: not a valid signature file (key_id and algorithm must be strings)")
    if algorithm != ALGORITHM:
        raise BundleError(f"{sig_path}: algorithm {algorithm!r} is not {ALGORITHM}")
    if len(signature) != 64:  # every Ed25519 signature is 64 bytes
        raise BundleError(f"{sig_path}: not a valid signature file (an Ed25519 signature is 64 bytes, "
                          f"this one {len(signature)})")
    return kid, signature


def verify_manifest(bundle_dir: Path | str, trusted_keys: list[Path | str]) -> str:
    """The id of the trusted key whose signature over ``manifest.json`` checks out;
    BundleError (one line, saying why) for an unsigned bundle, a malformed signature
    file, a key not among ``trusted_keys`` or a signature that does not match."""
    _, _, invalid = _crypto()
    if not trusted_keys:
        raise ConfigError("no trusted keys given to verify the bundle's signature with")
    keys = {key_id(k): k for k in map(load_public_key, trusted_keys)}
    root = Path(bundle_dir)
    if not (root / SIGNATURE).is_file():
        raise BundleError(f"{root}: the bundle is not signed (no {SIGNATURE}) and trusted keys are configured")
    kid, signature = read_signature(root)
    if kid not in keys:
        raise BundleError(f"{root}: signed by key {str(kid)[:16]}..., which is not among the trusted keys "
                          f"({', '.join(k[:16] + '...' for k in keys)})")
    try:
        keys[kid].verify(signature, (root / "manifest.json").read_bytes())
    except invalid:
        raise BundleError(f"{root}: the signature does not match manifest.json (the bundle was changed after "
                          "signing)") from None
    return kid
