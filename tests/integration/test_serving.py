"""Real HTTP against a real Ray Serve application."""

import pytest
import requests

from raylm.config import ServeConfig

PORT = 8123
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from raylm.config import ModelConfig
    from raylm.data.demo import generate_demo_corpus
    from raylm.data.formatting import format_example
    from raylm.data.tokenizer import special_token_ids, train_bpe_tokenizer
    from raylm.models.registry import build_model

    folder = tmp_path_factory.mktemp("served-model")
    corpus = generate_demo_corpus(seed=0, num_train=200, num_dev=10)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=500)
    model = build_model(ModelConfig(size="debug"), len(tokenizer), 256, special_token_ids(tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_url(ray_session, model_dir):
    from ray import serve

    from raylm.serving.app import start_serving

    config = ServeConfig(port=PORT, api_key=API_KEY, max_input_chars=500, max_new_tokens=8)
    url = start_serving(str(model_dir), config)
    yield url
    serve.delete("raylm")


def _post(base_url, route, body, key=API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{base_url}{route}", headers=headers, timeout=60, **({"json": body} | kwargs))


def test_binds_loopback_by_default():
    assert ServeConfig().host == "127.0.0.1"


def test_healthz(base_url):
    response = requests.get(f"{base_url}/healthz", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_task_endpoints_answer(base_url):
    translated = _post(base_url, "/v1/translate", {"text": "the dog sees the cat."})
    assert translated.status_code == 200, translated.text
    assert isinstance(translated.json()["translation"], str)
    answered = _post(base_url, "/v1/qa", {"context": "Anna lives in Oslo.", "question": "Where does Anna live?"})
    # extractive: even an untrained model can only quote the passage
    assert answered.status_code == 200 and answered.json()["answer"] in "Anna lives in Oslo."
    sentiment = _post(base_url, "/v1/sentiment", {"text": "the movie was great"})
    body = sentiment.json()
    assert sentiment.status_code == 200 and body["label"] in ("positive", "negative") and 0.5 <= body["score"] <= 1


def test_api_key_required(base_url):
    missing = _post(base_url, "/v1/sentiment", {"text": "fine"}, key=None)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    wrong = _post(base_url, "/v1/sentiment", {"text": "fine"}, key="nope")
    assert wrong.status_code == 401


@pytest.mark.parametrize(
    "route, body, status, fragment",
    [
        ("/v1/qa", {"context": "x"}, 422, "question"),
        ("/v1/translate", {"text": ""}, 422, "text"),
        ("/v1/translate", {"text": "hi", "extra": 1}, 422, "extra"),
        ("/v1/sentiment", {"text": 5}, 422, "text"),
        ("/v1/sentiment", {"text": "x" * 501}, 413, "limit is 500"),
    ],
)
def test_bad_requests_get_json_4xx(base_url, route, body, status, fragment):
    response = _post(base_url, route, body)
    assert response.status_code == status
    assert fragment in response.json()["error"]


def test_malformed_json_and_unknown_route(base_url):
    response = requests.post(f"{base_url}/v1/qa", data="{not json", timeout=60,
                             headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 422 and "error" in response.json()
    missing = requests.get(f"{base_url}/v1/nothing", timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 404 and "error" in missing.json()
