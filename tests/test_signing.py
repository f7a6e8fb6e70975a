"""Signed bundles: keygen, export --sign-key, verify, and the node refusing (or flagging)
a bundle whose manifest is not signed by a trusted key — every tampering of the issue
included: a widened region, a changed δ, a swapped model, each re-hashed."""

import json
import shutil
import stat
import subprocess
import sys

import pytest

pytest.importorskip("cryptography", reason="bundle signatures need the cryptography package")

from usn_offline.cli import main  # noqa: E402
from usn_offline.errors import BundleError, ConfigError  # noqa: E402
from usn_offline.runtime.bundle import Bundle  # noqa: E402
from usn_offline.runtime.hashing import sha256_file  # noqa: E402
from usn_offline.runtime.signing import SIGNATURE, generate_key, sign_manifest, verify_manifest  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "--out", str(root / "release")]) == 0
    other, other_pub = generate_key(root / "other")
    return {"private": root / "release", "public": root / "release.pub", "other": other, "other_pub": other_pub}


@pytest.fixture(scope="module")
def signed(exported_bundle, keys, tmp_path_factory):
    """A bundle exported with --sign-key, through the CLI."""
    fixture = exported_bundle.parent
    out = tmp_path_factory.mktemp("signed") / "bundle"
    code = main(["export", "--checkpoint", str(fixture / "m.pt"), "--certificate", str(fixture / "cert.json"),
                 "--out", str(out), "--no-engine", "--sign-key", str(keys["private"])])
    assert code == 0 and (out / SIGNATURE).is_file()
    return out


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, capsys):
    assert stat.S_IMODE(keys["private"].stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in keys["private"].read_bytes() and b"PUBLIC KEY" in keys["public"].read_bytes()
    assert main(["keygen", "--out", str(keys["private"])]) == 2
    assert "already exists: keys are never overwritten" in capsys.readouterr().err


def test_a_signed_bundle_verifies_with_its_key_only(signed, keys, capsys):
    assert main(["verify", "--bundle", str(signed), "--trusted-key", str(keys["public"])]) == 0
    assert "signature OK: signed by trusted key" in capsys.readouterr().out
    assert verify_manifest(signed, [keys["other_pub"], keys["public"]])  # one of several trusted keys
    with pytest.raises(BundleError, match="not among the trusted keys"):
        verify_manifest(signed, [keys["other_pub"]])
    with pytest.raises(ConfigError, match="trusted key not found"):
        verify_manifest(signed, [keys["public"].with_name("missing.pub")])
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_manifest(signed, [keys["private"]])


def _tampered(signed, tmp_path, edit):
    """A copy of the signed bundle with its certificate edited and everything re-hashed
    (what someone who can write the bundle but has no key can do)."""
    root = tmp_path / "tampered"
    shutil.copytree(signed, root)
    cert = json.loads((root / "certificate.json").read_text())
    edit(cert, root)
    (root / "certificate.json").write_text(json.dumps(cert))
    manifest = json.loads((root / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    cert["model_sha256"] = manifest["files"]["model.onnx"]["sha256"]
    (root / "certificate.json").write_text(json.dumps(cert))
    manifest["files"]["certificate.json"] = {"sha256": sha256_file(root / "certificate.json"),
                                             "bytes": (root / "certificate.json").stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    Bundle.load(root)  # consistent: only the signature can tell
    return root


def _widen(cert, root):
    cert["region"]["boxes"] = [{"a_lo": 0.2, "a_hi": 5.0, "b_lo": -0.9, "b_hi": 0.9}]


def _delta(cert, root):
    cert["delta_px"] = 50.0


def _model(cert, root):
    raw = bytearray((root / "model.onnx").read_bytes())
    raw[-10] ^= 1  # another model (a flipped weight bit)
    (root / "model.onnx").write_bytes(bytes(raw))


@pytest.mark.parametrize("edit", [_widen, _delta, _model])
def test_every_tampering_breaks_the_signature(signed, keys, tmp_path, edit):
    root = _tampered(signed, tmp_path, edit)
    with pytest.raises(BundleError, match="the signature does not match manifest.json"):
        verify_manifest(root, [keys["public"]])
    # Re-signing needs the private key: with another key, the signer is not trusted.
    sign_manifest(root, keys["other"])
    with pytest.raises(BundleError, match="not among the trusted keys"):
        verify_manifest(root, [keys["public"]])


def test_unsigned_and_malformed_signatures(signed, keys, tmp_path, exported_bundle):
    with pytest.raises(BundleError, match="the bundle is not signed"):
        verify_manifest(exported_bundle, [keys["public"]])
    root = tmp_path / "b"
    shutil.copytree(signed, root)
    (root / SIGNATURE).write_text('{"algorithm": "ed25519", "key_id": "x", "signature": "!!"}')
    with pytest.raises(BundleError, match="not a valid signature file"):
        verify_manifest(root, [keys["public"]])
    (root / SIGNATURE).write_text("[" * 100000)
    with pytest.raises(BundleError, match="not a valid signature file"):
        verify_manifest(root, [keys["public"]])
    (root / SIGNATURE).write_text('{"algorithm": "ed25519", "key_id": "x", "signature": "AAAA"}')
    with pytest.raises(BundleError, match="an Ed25519 signature is 64 bytes, this one 3"):
        verify_manifest(root, [keys["public"]])


def test_verify_without_trusted_keys_names_the_signer_and_refuses_a_malformed_signature(signed, exported_bundle,
                                                                                        keys, tmp_path, capsys):
    """Unchecked is said as such; a signature file that is not one is an error even then."""
    assert main(["verify", "--bundle", str(signed)]) == 0
    kid = json.loads((signed / SIGNATURE).read_text())["key_id"]
    assert f"signature not checked (signed with key {kid[:16]}...; pass --trusted-key" in capsys.readouterr().out
    assert main(["verify", "--bundle", str(exported_bundle)]) == 0
    assert "signature not checked (unsigned;" in capsys.readouterr().out
    root = tmp_path / "garbage"
    shutil.copytree(signed, root)
    (root / SIGNATURE).write_text("not a signature")
    assert main(["verify", "--bundle", str(root)]) != 0
    err = capsys.readouterr().err
    assert "manifest.sig: not a valid signature file" in err and len(err.strip().splitlines()) == 1


def _node(bundle, *params):
    args = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p", f"bundle_dir:={bundle}"]
    for p in params:
        args += ["-p", p]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_the_node_refuses_a_bundle_not_signed_by_a_trusted_key(signed, keys, tmp_path, exported_bundle):
    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    tampered = _tampered(signed, tmp_path, _widen)
    for bundle, message in ((tampered, "the signature does not match manifest.json"),
                            (exported_bundle, "the bundle is not signed")):
        proc = _node(bundle, f"trusted_keys:=[{keys['public']}]")
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "on_untrusted_bundle:=flag serves it uncertified" in proc.stderr


def _started_log(bundle, *params, wait_for: str) -> str:
    """Start the node, wait until its log shows ``wait_for`` (or 60 s), stop it; its log."""
    from ros_helpers import log_until

    args = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p", f"bundle_dir:={bundle}",
            "-p", "frame_proof:=false"]
    for p in params:
        args += ["-p", p]
    return log_until(args, bundle.parent / "node.log", wait_for, timeout=60)


def test_the_node_serves_a_trusted_bundle_and_flags_an_untrusted_one_by_policy(signed, keys, tmp_path):
    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    log = _started_log(signed, f"trusted_keys:=[{keys['other_pub']},{keys['public']}]",
                       wait_for="bundle signed by trusted key")
    assert "bundle signed by trusted key" in log and "Traceback" not in log
    tampered = _tampered(signed, tmp_path, _delta)
    log = _started_log(tampered, f"trusted_keys:=[{keys['public']}]", "on_untrusted_bundle:=flag",
                       wait_for="serving with every frame flagged")
    assert "the signature does not match manifest.json" in log
    assert "serving with every frame flagged CERTIFICATE_MISMATCH" in log and "Traceback" not in log


def test_a_node_stopped_while_starting_exits_quietly(signed):
    """SIGTERM at any point of the start-up (before, while and after the bundle loads and
    the publishers are made) stops the node without a traceback."""
    import os
    import signal
    import time

    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    args = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p", f"bundle_dir:={signed}",
            "-p", "frame_proof:=false"]
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err.decode(), (delay, err.decode()[-2000:])
        assert proc.returncode in (0, -signal.SIGTERM), (delay, proc.returncode)
