"""API keys and HTTPS: a server started with --api-key and --ssl-certfile/--ssl-keyfile,
driven by diffusers' remote_decode the way docs/security.md tells users to."""

from __future__ import annotations

import base64

import pytest
import requests
import torch
from conftest import LiveServer, offline_env, seeded, self_signed_certificate
from diffusers.utils import remote_utils
from diffusers_reference import run_cli

from remote_vae.server.auth import ApiKeyError, load_api_keys, presented_key

KEY = "k3y-0123456789abcdef-for-tests"
ROTATED = "second-key-0123456789abcdef"
LATENT = {"shape": [1, 4, 8, 8], "dtype": "float32", "output_type": "pt"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure(model_dirs, certificate, tmp_path_factory):
    cert, key = certificate
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# rotation: both keys are valid\n{ROTATED}\n")
    args = [
        "sd15",
        "--model",
        str(model_dirs["sd15"]),
        "--api-key",
        KEY,
        "--api-key-file",
        str(key_file),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
    ]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "secure.log", verify=str(cert))
    yield server
    server.stop()


def post(server, **kwargs) -> requests.Response:
    return requests.post(
        server.url + "/",
        params=LATENT,
        data=bytes(4 * 64 * 4),
        verify=server.verify,
        headers={"Content-Type": "tensor/binary", **kwargs.pop("headers", {})},
        timeout=30,
        **kwargs,
    )


def test_health_and_metrics_stay_open(secure):
    assert requests.get(secure.url + "/health", verify=secure.verify).status_code == 200
    assert requests.get(secure.url + "/metrics", verify=secure.verify).status_code == 200


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key-0123456789", f"Token {KEY}", "Bearer", f"Basic {KEY}"]
)
def test_post_without_a_valid_key_is_401_json(secure, authorization):
    response = post(secure, headers={"Authorization": authorization} if authorization else {})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["error"] and KEY not in response.text


@pytest.mark.parametrize("key", [KEY, ROTATED])
def test_bearer_key_from_flag_or_file_is_accepted(secure, key):
    assert post(secure, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_key_as_url_password_for_clients_that_only_take_a_url(secure):
    # requests turns https://user:KEY@host/ into HTTP Basic: what a ComfyUI node's URL field can carry.
    url = secure.url.replace("https://", f"https://remote-vae:{KEY}@") + "/"
    response = requests.post(
        url, params=LATENT, data=bytes(4 * 64 * 4), headers={"Content-Type": "tensor/binary"}, verify=secure.verify
    )
    assert response.status_code == 200


def test_diffusers_remote_decode_with_a_session_that_carries_the_key(secure, reference, monkeypatch):
    # The recipe in docs/security.md: remote_utils posts through whatever `requests` it holds.
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    monkeypatch.setattr(remote_utils, "requests", session)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", secure.verify)  # a self-signed certificate; not needed with a public one
    latent = seeded(1, 4, 8, 8)
    out = remote_utils.remote_decode(
        secure.url + "/", tensor=latent, output_type="pt", return_type="pt", do_scaling=False
    )
    with torch.no_grad():
        torch.testing.assert_close(out, reference["sd15"].decode(latent).sample, atol=1e-4, rtol=1e-4)


def test_the_key_in_a_netrc_file_reaches_clients_with_hard_coded_urls(secure, reference, monkeypatch, tmp_path):
    """docs/clients.md: a client that sends no key (SD.Next, kijai's and Visionatrix's nodes, diffusers) gets one from
    ~/.netrc (here NETRC names the file): requests sends it as Basic credentials, which the server takes."""
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login remote-vae password {KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", secure.verify)
    latent = seeded(1, 4, 8, 8)
    out = remote_utils.remote_decode(
        secure.url + "/", tensor=latent, output_type="pt", return_type="pt", do_scaling=False
    )
    with torch.no_grad():
        torch.testing.assert_close(out, reference["sd15"].decode(latent).sample, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    assert post(secure).status_code == 401  # without it, refused: the file is what carried the key


def test_tls_is_real(secure):
    with pytest.raises(requests.exceptions.SSLError):  # not trusted without the certificate
        requests.get(secure.url + "/health", timeout=10)
    with pytest.raises(requests.ConnectionError):  # and no plain HTTP on the port
        requests.get(secure.url.replace("https://", "http://") + "/health", timeout=10)


def test_key_settings():
    assert load_api_keys(KEY, None) == (KEY,)
    assert load_api_keys(None, None) == ()
    for bad in ("short", "has a space in it 0123456789"):
        with pytest.raises(ApiKeyError):
            load_api_keys(bad, None)
    with pytest.raises(ApiKeyError):
        load_api_keys(None, "/nonexistent/keys.txt")


def test_presented_key_forms():
    assert presented_key(f"Bearer {KEY}".encode()) == KEY.encode()
    assert presented_key(f"bearer   {KEY} ".encode()) == KEY.encode()
    assert presented_key(b"Basic " + base64.b64encode(f"user:{KEY}".encode())) == KEY.encode()
    for bad in (b"", b"Bearer ", b"Basic !!!", b"Basic " + base64.b64encode(b"no-colon"), KEY.encode()):
        assert presented_key(bad) is None


def test_container_healthcheck_speaks_https(secure):
    """`python -m remote_vae health` (the image's HEALTHCHECK) uses HTTPS when the server is configured for it."""
    for certfile, status in ((secure.verify, 0), (None, 1)):  # plain HTTP to a TLS port fails
        env = offline_env(**({"REMOTE_VAE_SSL_CERTFILE": certfile} if certfile else {}))
        done = run_cli("health", "--port", str(secure.port), env=env)
        assert done.returncode == status, done.stdout + done.stderr
