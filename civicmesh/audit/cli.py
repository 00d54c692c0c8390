"""``civicmesh audit``: keys, verification and witnessing of the public audit log."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from civicmesh.audit import AuditError
from civicmesh.audit.merkle import consistency_proof
from civicmesh.audit.note import ALG_COSIGNATURE_V1, ALG_ED25519, NoteKey, NoteSigner
from civicmesh.audit.tiles import FolderSource, TileHashStore, open_source
from civicmesh.audit.verify import (
    Trust,
    Verifier,
    default_jobs,
    read_key_arg,
    registry_from_snapshot,
)
from civicmesh.audit.witness import CheckpointState, Witness
from civicmesh.identity import VerifyKey
from civicmesh.registry import Registry


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "civicmesh" / "audit-verify.json"


def _note_key(text: str, what: str) -> NoteKey:
    try:
        return NoteKey.from_vkey(read_key_arg(text))
    except (OSError, ValueError) as exc:
        raise AuditError(f"{what}: {exc}", reason="audit.key") from None


def cmd_keygen(args: argparse.Namespace) -> int:
    key_type = ALG_COSIGNATURE_V1 if args.witness else ALG_ED25519
    try:
        signer = NoteSigner.generate(args.name, key_type)
    except ValueError as exc:
        raise AuditError(str(exc), reason="audit.key") from None
    out = Path(args.out)
    signer.save(out)
    vkey = out.with_suffix(".vkey")
    vkey.write_text(signer.key.to_vkey() + "\n")
    print(f"private key: {out} (mode 0600)\npublic key:  {vkey}\n{signer.key.to_vkey()}")
    return 0


def _registry(args: argparse.Namespace, source_where: str) -> Registry:
    if args.registry:
        return Registry.load(Path(args.registry))
    if not args.authority:
        raise AuditError(
            "give the registry: --registry FILE (a registry you trust) or --authority KEY "
            "(the registry authority's public key, to check the log's signed snapshot)",
            reason="usage",
        )
    try:
        authority = VerifyKey.from_text(read_key_arg(args.authority))
    except ValueError as exc:
        raise AuditError(f"--authority: {exc}", reason="usage") from None
    return registry_from_snapshot(open_source(source_where).get("registry"), authority)


def cmd_verify(args: argparse.Namespace) -> int:
    source = open_source(args.source)
    witnesses = tuple(_note_key(w, "--witness") for w in args.witness)
    quorum = len(witnesses) if args.quorum is None else args.quorum
    if quorum > len(witnesses):
        raise AuditError(
            f"--quorum {quorum} exceeds the {len(witnesses)} witnesses given", reason="usage"
        )
    trust = Trust(
        _note_key(args.log_key, "--log-key"), _registry(args, args.source), witnesses, quorum
    )
    state = (
        None
        if args.no_state
        else CheckpointState(Path(args.state) if args.state else default_state_path())
    )
    peers = [open_source_file(p) for p in args.peer]
    wait = args.wait_witnesses
    if wait is None:  # a live API may not have its newest checkpoint cosigned yet
        wait = 0.0 if isinstance(source, FolderSource) else 15.0
    verifier = Verifier(
        source,
        trust,
        state=state,
        peers=peers,
        allow_gaps=args.allow_gaps,
        jobs=args.jobs,
        wait_witnesses_s=wait,
    )
    report = verifier.run(args.start, args.end)
    if args.json:
        failure = report.failure
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "size": report.size,
                    "cosigned_by": [n for n, _ in report.cosigned_by],
                    "checked": [report.checked_from, report.checked_to],
                    "devices": report.devices,
                    "gaps": len(report.gaps),
                    "failure": None
                    if failure is None
                    else {
                        "reason": failure.reason,
                        "index": failure.index,
                        "message": failure.message,
                    },
                }
            )
        )
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


def open_source_file(where: str) -> bytes:
    """A checkpoint from a file or a URL (``--peer``)."""
    if where.startswith(("http://", "https://")):
        base, _, name = where.rpartition("/")
        return open_source(base).get(name)
    try:
        return Path(where).read_bytes()
    except OSError as exc:
        raise AuditError(f"--peer {where}: {exc}", reason="usage") from None


def cmd_witness(args: argparse.Namespace) -> int:
    """One witnessing round: fetch the checkpoint, check it, print the cosignature line."""
    source = open_source(args.source)
    witness = Witness(
        NoteSigner.load(Path(args.key)), _note_key(args.log_key, "--log-key"), Path(args.state)
    )
    note = source.get("checkpoint")

    def proof_for(m: int, n: int) -> list[bytes]:
        return consistency_proof(TileHashStore(source, n), m, n)

    print(witness.cosign(note, proof_for).line(), end="")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("audit", help="the public audit log: keys, verify, witness")
    asub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    keygen = asub.add_parser("keygen", help="make a log key or a witness key (signed-note format)")
    keygen.add_argument(
        "--name", required=True, help="key name, e.g. the log origin civicmesh.example/log"
    )
    keygen.add_argument("--out", required=True, help="private key file (the .vkey goes beside it)")
    keygen.add_argument("--witness", action="store_true", help="a witness (cosignature/v1) key")
    keygen.set_defaults(func=cmd_keygen)

    verify = asub.add_parser("verify", help="check the log from a mirror folder or the API")
    verify.add_argument("source", help="mirror folder, or the API's audit URL (.../api/v1/audit)")
    verify.add_argument("--log-key", required=True, help="the log's vkey (text, or a file)")
    verify.add_argument("--witness", action="append", default=[], help="a witness vkey (repeat)")
    verify.add_argument(
        "--quorum", type=int, default=None, help="cosignatures required (default: all)"
    )
    verify.add_argument("--registry", help="registry JSON to trust for device and gateway keys")
    verify.add_argument(
        "--authority", help="registry authority key: check the log's signed snapshot"
    )
    verify.add_argument("--state", help=f"checkpoints seen before (default {default_state_path()})")
    verify.add_argument("--no-state", action="store_true", help="do not read or write a state file")
    verify.add_argument(
        "--peer", action="append", default=[], help="a checkpoint seen elsewhere (file or URL)"
    )
    verify.add_argument(
        "--from", dest="start", type=int, default=0, help="first leaf index to check"
    )
    verify.add_argument(
        "--to", dest="end", type=int, default=None, help="end of the range (exclusive)"
    )
    verify.add_argument(
        "--allow-gaps", action="store_true", help="a device's seq may skip (lost batches)"
    )
    verify.add_argument("--jobs", type=int, default=default_jobs(), help="processes for signatures")
    verify.add_argument("--json", action="store_true", help="one JSON object instead of text")
    verify.add_argument(
        "--wait-witnesses",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds for a checkpoint short of --quorum to be cosigned "
        "(default: 15 for an API URL, 0 for a mirror folder)",
    )
    verify.set_defaults(func=cmd_verify)

    witness = asub.add_parser("witness", help="check the log's checkpoint and print a cosignature")
    witness.add_argument("source", help="mirror folder or the API's audit URL")
    witness.add_argument("--key", required=True, help="the witness's private key file")
    witness.add_argument("--log-key", required=True, help="the log's vkey")
    witness.add_argument("--state", required=True, help="the witness's state file")
    witness.set_defaults(func=cmd_witness)


def main() -> None:  # pragma: no cover - convenience for python -m
    from civicmesh.cli import main as cli_main

    sys.exit(cli_main(["audit", *sys.argv[1:]]))
