"""Command line: `remote-vae serve FAMILY ...` (or `python -m remote_vae ...`), and its client commands.

`serve` and `download` start the server's machinery (launch.py); everything else
here, `--help`, `families`, `health` and the argument parsing (settings.py), answers
without importing torch. `decode` and `encode` are the client (client.py) on files.
Every serve option has an environment variable (REMOTE_VAE_<OPTION>), so a
container is configured by its environment alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import urllib.request
from pathlib import Path

from . import families
from .families import Family, FamilyError
from .settings import Settings, SettingsError, add_arguments, env, option, settings_from
from .vocabulary import Packing

log = logging.getLogger("remote_vae")


def build_parser() -> argparse.ArgumentParser:
    """The command line; it imports no torch (settings.py), so --help and the client commands answer at once."""
    parser = argparse.ArgumentParser(
        prog="remote-vae", description="Serve diffusion-model VAEs over HTTP, and call such a server."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    add_arguments(commands.add_parser("serve", help="serve one or more VAE families"))

    listing = commands.add_parser("families", help="list the families in configs/")
    listing.add_argument("--markdown", action="store_true", help="the client calls as docs/families.md's table")

    download = commands.add_parser(
        "download", help="copy families' VAE weights from the Hub into DIR/<family>/ (to bake them into an image)"
    )
    download.add_argument("families", nargs="+", metavar="FAMILY")
    download.add_argument(
        "--to",
        default=env("WEIGHTS_DIR"),
        required=env("WEIGHTS_DIR") is None,
        metavar="DIR",
        help="[env REMOTE_VAE_WEIGHTS_DIR]",
    )

    health = commands.add_parser(
        "health", help="exit 0 if the server on this machine answers /health with 200 (a container HEALTHCHECK)"
    )
    port = option("--port")  # the port `serve` listens on, from the same variables
    health.add_argument(
        "--port",
        type=int,
        default=port.default(),
        help=f"[env {port.variable} or {port.also_read}] (default {Settings.port})",
    )
    health.add_argument("--timeout", type=float, default=5.0)

    add_client_commands(commands)
    return parser


def check_health(port: int, timeout: float) -> int:
    """GET /health on this machine's server, over HTTPS when it serves HTTPS; 0 when it answers 200."""
    scheme = "https" if env("SSL_CERTFILE") else "http"
    context = None
    if scheme == "https":  # our own certificate, reached by IP: its name cannot match, and no secret is sent
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/health", timeout=timeout, context=context
        ) as response:
            print(response.read().decode(errors="replace"))
            return 0 if response.status == 200 else 1
    except OSError as exc:  # refused, timed out, or an HTTPError such as 503 while loading
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


def client_call(family: Family) -> str:
    """The diffusers call that decodes the latents the family's pipeline hands out (output_type="latent") to that
    pipeline's pixels exactly: a PNG for an image (diffusers' default reply is a JPEG), uint8 frames [F, H, W, 3] for a
    video (an MP4 is lossy), uint8 [1, H, W, 4] for an RGBA image (remote_decode makes a PNG's PIL image RGB).
    docs/families.md shows these; a test runs each."""
    # remote_decode sends do_scaling=True by default (a deprecated argument): per-channel families' calls pass nothing,
    # and a family whose pipeline hands out its VAE's own latent (LTX-2) passes do_scaling=False.
    scaling = family.client_scaling()
    arguments = [f"{name}={value}" for name, value in scaling.items() if (name, value) != ("do_scaling", True)]
    if family.layout.packing != Packing.NONE:
        arguments += ["height=H", "width=W"]
    if family.is_audio:  # the waveform as its pipeline's vae.decode returns it; remote_decode wants sizes for a 3-D one
        arguments += ['output_type="pt"', "partial_postprocess=False", 'return_type="pt"', "height=1", "width=1"]
    elif family.is_video or family.pixel_channels == 4:  # uint8 frames; RGBA pixels (remote_decode's PIL is RGB)
        arguments += ['output_type="pt"', "partial_postprocess=True", 'return_type="pt"']
    else:
        arguments += ['image_format="png"']
    # LTX-2's pipeline hands out its sound latent as a transposed view, and remote_decode sends a non-contiguous
    # tensor's bytes from a temporary it has freed (diffusers' safetensors._to_ndarray): a copy in order goes whole.
    latents = "latents.contiguous()" if family.audio and family.audio.latent_bins else "latents"
    return f"remote_decode(url, {latents}, {', '.join(arguments)})"


def _sound(family: Family) -> str:
    audio = family.audio
    return f"audio, {audio.sampling_rate} Hz, {audio.channels} channels, {audio.hop_length} samples per latent step"


def client_table(shipped: list[Family]) -> str:
    """docs/families.md's table of client calls (`remote-vae families --markdown`; a test keeps the two equal)."""
    rows = [f"| `{family.name}` | `{client_call(family)}` |" for family in shipped]
    return "\n".join(["| family | the pipeline's pixels, exactly |", "|---|---|", *rows])


def describe(family: Family) -> str:
    """A family for `families`: what it is, its weights, the latents it takes, and what a client passes to decode
    them."""
    extra = "; optional decode_timestep=, decode_noise_scale=, decode_noise_seed=" if family.decode_timestep else ""
    frames = f"{family.frame_step}k+1" if family.first_frame_alone else f"{family.frame_step}k"
    kind = _sound(family) if family.is_audio else f"video, {frames} frames" if family.is_video else "image"
    wire = "&".join(f"{name}={value}" for name, value in family.client_scaling().items())
    return "\n".join(
        [
            f"{family.name} ({kind}): {family.description}",
            f"  weights  {family.hub_id}",
            f"  serves   {', '.join(family.pipelines) or '(its own pipelines)'}",
            f"  latents  {family.layout.describe()}",
            f"  client   {client_call(family)}{extra}",
            f"  wire     {wire or '(no scaling)'}",
        ]
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
OUTPUT_SUFFIXES = IMAGE_SUFFIXES + (".mp4", ".wav", ".flac", ".safetensors")


# long: one declaration per option of the two client commands, in the order --help lists them
def add_client_commands(commands) -> None:
    """`decode` and `encode`: the client on files, several at once."""

    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "-o",
            "--output",
            required=True,
            metavar="OUT",
            help="the file to write; with several inputs, a pattern with {name} (the input's name without suffix), or "
            "a directory",
        )
        command.add_argument(
            "--url",
            default=env("URL"),
            required=env("URL") is None,
            help="the server, or one family's path on it [env REMOTE_VAE_URL]",
        )
        command.add_argument("--family", help="which family, when the server serves several")
        command.add_argument(
            "--api-key-env",
            default="REMOTE_VAE_API_KEY",
            metavar="VAR",
            help="environment variable holding the API key (default REMOTE_VAE_API_KEY; unset: no key)",
        )
        command.add_argument("--ca-cert", metavar="PEM", help="trust this certificate (a self-signed server)")
        command.add_argument(
            "--timeout", type=float, default=300.0, help="seconds to wait for the server (default 300)"
        )
        command.add_argument(
            "--retries",
            type=int,
            default=3,
            help="retries after 503 (queue full, loading) or a dropped connection (default 3)",
        )
        command.add_argument(
            "--raw", action="store_true", help="latents are the VAE's own, not normalised as the pipeline holds them"
        )

    decode = commands.add_parser(
        "decode", help="decode latent files on a server: .safetensors, .pt or .npy to .png/.jpg/.webp/.mp4/.safetensors"
    )
    decode.add_argument(
        "inputs",
        nargs="+",
        metavar="LATENTS",
        help="a pipeline's output_type='latent', saved with safetensors.torch.save_file (or torch.save, numpy.save); "
        "LTX-2's as keys 'latents' and 'audio_latents' decode to the video with its sound",
    )
    decode.add_argument("--key", help="the tensor's name in a file that holds several")
    decode.add_argument("--height", type=int, help="pixel height, for packed latents (Flux, Qwen-Image, LTX)")
    decode.add_argument("--width", type=int, help="pixel width, for packed latents")
    decode.add_argument(
        "--format",
        choices=[suffix[1:] for suffix in OUTPUT_SUFFIXES],
        help="output format when OUT is a directory (default png, mp4 for video families, wav for audio families)",
    )
    decode.add_argument("--fps", type=float, help="frame rate of an MP4")
    common(decode)
    encode = commands.add_parser(
        "encode", help="encode images, videos or audio on a server to latents (.safetensors, key 'latents')"
    )
    encode.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_VIDEO_OR_AUDIO",
        help="a .png, .jpg, .webp, .mp4, .webm, .gif, .wav or .flac file",
    )
    common(encode)


def output_paths(output: str, inputs: list[str], suffix: str) -> list[Path]:
    """Where each input's result goes: OUT itself for one input; OUT with {name} filled in, or OUT/<name><suffix>, for
    several."""
    if "{name}" in output:
        return [Path(output.format(name=Path(source).stem)) for source in inputs]
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        return [Path(output) / f"{Path(source).stem}{suffix}" for source in inputs]
    if len(inputs) > 1:
        raise SettingsError(f"{len(inputs)} inputs need -o with {{name}} in it (e.g. out/{{name}}.png) or a directory")
    return [Path(output)]


def run_client(args: argparse.Namespace) -> int:
    """decode / encode each input on the server; 0 when all succeeded, 1 when the server refused or failed any, 2 on
    bad arguments."""
    from tqdm import tqdm

    from .client import Client, RemoteVaeError, family_kind

    api_key = os.environ.get(args.api_key_env)
    if args.api_key_env != "REMOTE_VAE_API_KEY" and not api_key:
        raise SettingsError(f"--api-key-env {args.api_key_env}: that variable is not set")
    for source in args.inputs:
        if not Path(source).is_file():
            raise SettingsError(f"{source}: no such file")
    failed = 0
    verify = args.ca_cert or True
    with Client(args.url, api_key=api_key, timeout=args.timeout, retries=args.retries, verify=verify) as client:
        try:
            family = client.family(args.family)
        except (ValueError, RemoteVaeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, (RemoteVaeError, OSError)) else 2
        targets = output_paths(args.output, args.inputs, default_suffix(args, family_kind(family)))
        for target in targets:
            if args.command == "decode" and target.suffix.lower() not in OUTPUT_SUFFIXES:
                raise SettingsError(f"{target}: expected an output ending in {', '.join(OUTPUT_SUFFIXES)}")
        pairs = list(zip(args.inputs, targets, strict=True))
        for source, target in tqdm(pairs, unit="file", disable=len(targets) < 2, file=sys.stderr):
            try:
                written = run_one(client, args, source, target)
                tqdm.write(" ".join(str(path) for path in written), file=sys.stdout)
            except (RemoteVaeError, OSError, ValueError) as exc:  # OSError: connection failures, and files
                failed += 1
                tqdm.write(f"error: {source}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def default_suffix(args: argparse.Namespace, kind: str) -> str:
    """What an output is written as when -o names a directory or a pattern."""
    if args.command == "encode":
        return ".safetensors"
    return f".{args.format}" if args.format else {"video": ".mp4", "audio": ".wav"}.get(kind, ".png")


def run_one(client, args: argparse.Namespace, source: str, target: Path) -> list[Path]:
    """One input decoded or encoded on the server and written to target; the files written."""
    from .client import load_latents, load_with_sound, save_output

    if args.command == "decode":
        suffix = target.suffix.lower()
        files = {".mp4": "mp4", ".wav": "wav", ".flac": "flac", ".safetensors": "pt"}
        output = files.get(suffix, "pil")
        options = {"fps": args.fps} if args.fps else {}
        # A file of LTX-2's latents and audio_latents goes in one request to a family with sound: video and sound back
        if client.family(args.family).get("sound"):
            latents, sound = load_with_sound(source, args.key)
        else:
            latents, sound = load_latents(source, args.key), None
        result = client.decode(
            latents,
            args.family,
            output,
            normalised=not args.raw,
            height=args.height,
            width=args.width,
            audio_latents=sound,
            **options,
        )
        return save_output(result, target)
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": client.encode(source, args.family, normalised=not args.raw).contiguous()}, target)
    return [target]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "families":
            shipped = [families.load_family(name) for name in families.available()]
            print(client_table(shipped) if args.markdown else "\n\n".join(describe(family) for family in shipped))
            return 0
        if args.command == "health":
            return check_health(args.port, args.timeout)
        if args.command in ("decode", "encode"):
            return run_client(args)
        if args.command == "download":
            from . import launch

            return launch.download(args.families, Path(args.to))
        settings = settings_from(args)
        settings.served  # noqa: B018  (the families, checked before torch is imported: a typo fails at once)
        from . import launch

        return launch.serve(settings)
    except (FamilyError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
