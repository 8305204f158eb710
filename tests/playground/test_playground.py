"""The playground page in a real headless Chromium against a real server: search a feature, steer with
it, compare steered and unsteered streams, read activations, open a feature card, save a variant."""

from __future__ import annotations

import re

import httpx

from tests.playground.conftest import API_KEY

SEED, MAX_TOKENS, TEMPERATURE = 7, 24, 0.8


def open_page(page, server, scenario):
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").press("Enter")
    # NOTE: locator waits, not wait_for_function: the page's CSP (rightly) forbids the eval that needs
    page.locator("#model-name", has_text=scenario.model_name).wait_for()


def generate(page, prompt_box) -> None:
    """Enter in the prompt box; wait until the streams and the activation view are done, error-free."""
    prompt_box.press("Enter")  # the handler disables the button before its first await
    page.locator("#generate:enabled").wait_for(timeout=120_000)
    error = page.locator("#error")
    assert error.is_hidden(), f"the page shows an error: {error.inner_text()}"
    assert page.locator("#tokens .token").count() > 0


def search_and_add(page, query: str, feature: str) -> None:
    """Search `query`, press "More" until feature `feature` is listed, press its Add."""
    page.get_by_label("Search features", exact=True).fill(query)
    page.get_by_label("Search features", exact=True).press("Enter")
    add = page.get_by_role("button", name=f"Add {feature}", exact=True)
    more = page.get_by_role("button", name=f'More results for "{query}"')
    page.locator("#search-results li").first.wait_for()
    hits = page.locator("#search-results li.hit")
    while not add.count():
        shown = hits.count()
        more.click()  # fails (no such button) once the API has nothing more
        hits.nth(shown).wait_for()
    add.click()


def api(server, method: str, path: str, **kwargs) -> dict:
    r = httpx.request(method, server.url + path, headers=server.headers, timeout=60, **kwargs)
    assert r.status_code < 300, r.text
    return r.json()


def test_steer_compare_inspect_and_save(page, playground_server, scenario, screenshots):
    server = playground_server
    open_page(page, server, scenario)

    # search a feature by label and add it
    search_and_add(page, scenario.query, scenario.feature)
    # it starts scaled by its max activation (test_core_task); here: raw, as the API's default
    page.get_by_label(f"scale of {scenario.feature}", exact=True).select_option("raw")
    strength = page.get_by_label(f"strength of {scenario.feature} (number)")
    strength.fill(str(scenario.strength))
    strength.press("Tab")

    # sampling, then Enter in the prompt box generates
    page.get_by_label("temperature").fill(str(TEMPERATURE))
    page.get_by_label("max_tokens").fill(str(MAX_TOKENS))
    page.get_by_label("seed").fill(str(SEED))
    page.get_by_role("textbox", name=re.compile("^Prompt")).fill(scenario.prompt)
    generate(page, page.get_by_role("textbox", name=re.compile("^Prompt")))
    steered = page.locator("#out-steered").inner_text()
    unsteered = page.locator("#out-unsteered").inner_text()
    screenshots(page, "1-generated")
    assert steered and unsteered
    assert steered != unsteered, "the steered completion should differ from its unsteered twin"
    if scenario.steered_reads_as_meant is not None:
        assert scenario.steered_reads_as_meant(steered, unsteered), (steered, unsteered)

    # what the page showed is what the API returns for the same call, twin included
    sae, index = _feature_ref(scenario.feature)
    steering = [{"feature": {"sae": sae, "index": index}, "mode": "add", "strength": scenario.strength}]
    body = {
        "prompt": scenario.prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "seed": SEED,
        "steering": steering,
        "return_unsteered": True,
    }
    choices = api(server, "POST", "/v1/completions", json=body)["choices"]
    by_kind = {c["steered"]: c["text"] for c in choices}
    assert (by_kind[True], by_kind[False]) == (steered, unsteered)

    # activation view: the prompt + steered text read with the steering applied (as it was generated),
    # each token coloured by the added feature
    inspect = {"text": scenario.prompt + steered, "sae": sae, "top_k": 64}
    inspect["generate"] = {"max_tokens": 1, "steering": steering}
    inspected = api(server, "POST", "/v1/inspect", json=inspect)
    inspected["tokens"] = [t for t in inspected["tokens"] if not t["generated"]]
    expected = [
        next((f["activation"] for f in t["features"] if f["index"] == index), 0.0)
        for t in inspected["tokens"]
    ]
    tokens = page.locator("#tokens .token")
    assert tokens.count() == len(expected)
    shown = [float(v) for v in tokens.evaluate_all("spans => spans.map(s => s.dataset.activation)")]
    assert shown == [round(v, 4) for v in expected]
    assert any(v > 0 for v in expected), "the steered feature should be active somewhere in the text"
    # beside it the unsteered twin, read unsteered as it was generated
    twin = api(
        server, "POST", "/v1/inspect", json={"text": scenario.prompt + unsteered, "sae": sae, "top_k": 64}
    )
    twin_expected = [
        next((f["activation"] for f in t["features"] if f["index"] == index), 0.0) for t in twin["tokens"]
    ]
    twin_tokens = page.locator("#tokens-twin .token")
    twin_shown = twin_tokens.evaluate_all("spans => spans.map(s => s.dataset.activation)")
    assert [float(v) for v in twin_shown] == [round(v, 4) for v in twin_expected]
    # each token's colour strength is its activation over the peak of both texts (one scale)
    peak = max(abs(v) for v in expected + twin_expected)
    assert f"{peak:.3f}: one scale for both texts" in page.locator("#activation-legend").inner_text()
    alpha = "spans => spans.map(s => s.style.getPropertyValue('--alpha'))"
    alphas = tokens.evaluate_all(alpha) + twin_tokens.evaluate_all(alpha)
    assert [float(a) for a in alphas] == [round(min(1, abs(v) / peak), 3) for v in expected + twin_expected]
    hottest = max(range(len(expected)), key=lambda k: expected[k])
    if expected[hottest] >= peak:  # the steered text holds the peak: full colour there
        background = tokens.nth(hottest).evaluate("s => getComputedStyle(s).backgroundColor")
        assert background == "rgba(234, 88, 12, 0.85)", background

    # read unsteered, the added feature is weaker: the page re-reads the same text without the steering
    page.get_by_label("with the steering applied").uncheck()
    page.locator("#activation-note", has_text="read unsteered").wait_for()
    unsteered_acts = [float(v) for v in tokens.evaluate_all("spans => spans.map(s => s.dataset.activation)")]
    assert len(unsteered_acts) == len(expected) and sum(unsteered_acts) < sum(expected)
    screenshots(page, "2-read-unsteered")
    page.get_by_label("with the steering applied").check()
    page.locator("#activation-note", has_text="steering applied").wait_for()

    # hover a token: its top features, labelled
    tokens.nth(hottest).hover()
    detail = page.locator("#token-detail")
    expect_text = f"Token {hottest} "
    assert detail.inner_text().startswith(expect_text)
    top = inspected["tokens"][hottest]["features"][0]
    assert f"{feature_name(sae, top['index'], top['label'])}: {top['activation']:.3f}" in detail.inner_text()
    screenshots(page, "3-hover")

    # feature card: label, max activation, promoted and suppressed tokens as the API gives them
    page.get_by_role("button", name=f"Card of {scenario.feature}", exact=True).first.click()
    card = page.locator("#feature-card")
    info = api(server, "GET", f"/v1/saes/{sae}/features/{index}")
    expect_card = card.locator("h3")
    expect_card.wait_for()
    assert expect_card.inner_text() == scenario.feature
    assert f"max activation {info['max_activation']:.4g}"[:16] in card.inner_text()
    promoted = card.locator("ol").first.locator("li").all_inner_texts()
    assert len(promoted) == len(info["top_logits"]["promoted"]) > 0
    assert promoted[0].endswith(f"+{info['top_logits']['promoted'][0]['value']:.3f}")
    screenshots(page, "4-feature-card")

    # save the set as a variant: stored as sent, listed in /v1/models and in the page's model picker
    page.get_by_label("Save the current set as variant").fill("pg-test")
    page.get_by_role("button", name="Save variant").click()
    page.wait_for_selector(f"#model-select option[value='{scenario.model_name}:pg-test']", state="attached")
    assert page.locator("#error").is_hidden()
    ids = [m["id"] for m in api(server, "GET", "/v1/models")["data"]]
    assert f"{scenario.model_name}:pg-test" in ids
    assert api(server, "GET", "/v1/variants/pg-test")["steering"] == steering
    screenshots(page, "5-saved")


def feature_name(sae: str, index: int, label: str | None) -> str:
    """The name the page shows for a feature (dom.js featureName): "label (sae #index)" or "sae #index"."""
    return f"{label} ({sae} #{index})" if label else f"{sae} #{index}"


def _feature_ref(name: str) -> tuple[str, int]:
    """ "cold (weather) (demo-sae #230)" -> ("demo-sae", 230)."""
    m = re.search(r"\((\S+) #(\d+)\)$", name)
    assert m, name
    return m.group(1), int(m.group(2))


def test_key_errors_keyboard_variant_and_chat(page, playground_server, scenario, screenshots):
    server = playground_server
    page.goto(server.url + "/")
    # no key yet: the server's 401 message, readable, pointing at the key field
    error = page.locator("#error")
    error.filter(has_text="enter the key at the top of the page").wait_for()
    assert "missing or invalid API key" in error.inner_text()
    screenshots(page, "6-no-key")
    open_page(page, server, scenario)
    assert error.is_hidden()

    # every control has an accessible name (label, aria-label or its text)
    unnamed = page.locator("input, select, textarea, button").evaluate_all(
        """nodes => nodes.filter(n => !(n.labels && n.labels.length) && !n.getAttribute('aria-label')
                                 && !n.textContent.trim()).map(n => n.outerHTML)"""
    )
    assert unnamed == []

    # keyboard only: load the stored variant, add the stored vector
    variant = api(server, "GET", f"/v1/variants/{scenario.variant}")
    page.get_by_label("Variant", exact=True).select_option(scenario.variant)
    page.get_by_label("Variant", exact=True).focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Load"
    page.keyboard.press("Enter")
    # the variant's rows come as one collapsed group
    page.locator(
        "#steering-list summary",
        has_text=f"variant {scenario.variant}: {len(variant['steering'])} interventions",
    ).wait_for()
    page.get_by_label("Vector", exact=True).select_option(scenario.vector)
    page.get_by_label("Vector", exact=True).focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    rows = page.locator("#steering-list li.steer-row")
    rows.nth(len(variant["steering"])).wait_for()
    assert rows.count() == len(variant["steering"]) + 1
    assert page.locator("#steering-list li code").count() == 0  # no raw JSON rows: all editable

    # chat mode; a bad max_tokens comes back as the server's own message
    page.get_by_label("chat", exact=True).check()
    page.get_by_role("textbox", name=re.compile("^Prompt")).fill(scenario.prompt)
    page.get_by_label("max_tokens").fill("100000")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.get_by_role("textbox", name=re.compile("^Prompt")).press("Enter")
    error.wait_for()
    # the loaded variant's rows send back exactly the variant's interventions, then the vector's
    steering = sent.value.post_data_json["steering"]
    assert steering[: len(variant["steering"])] == variant["steering"]
    assert steering[-1] == {"vector": scenario.vector, "mode": "add", "strength": 4}
    messages = [{"role": "user", "content": scenario.prompt}]
    bad = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 100000},
        headers=server.headers,
    )
    assert bad.status_code == 400
    assert error.inner_text().startswith(bad.json()["error"]["message"])
    screenshots(page, "7-error")

    page.get_by_label("max_tokens").fill(str(MAX_TOKENS))
    generate(page, page.get_by_role("textbox", name=re.compile("^Prompt")))
    steering = [*variant["steering"], {"vector": scenario.vector, "mode": "add", "strength": 4}]
    body = {
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "seed": 1,
        "steering": steering,
        "return_unsteered": True,
    }
    choices = api(server, "POST", "/v1/chat/completions", json=body)["choices"]
    by_kind = {c["steered"]: c["message"]["content"] for c in choices}
    assert page.locator("#out-steered").inner_text() == by_kind[True]
    assert page.locator("#out-unsteered").inner_text() == by_kind[False]
    screenshots(page, "8-chat")


def test_page_served_without_key_and_self_contained(playground_server):
    page = httpx.get(playground_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
    assert "/playground/main.js" in assets and "/playground/style.css" in assets
    main = httpx.get(playground_server.url + "/playground/main.js").text
    assets += [f"/playground/{name}" for name in re.findall(r'from "\./([\w.]+)"', main)]
    texts = [page.text]
    for path in set(assets):
        r = httpx.get(playground_server.url + path)
        assert r.status_code == 200, path
        # an SVG's namespace is a name, not something loaded
        texts.append(r.text.replace('xmlns="http://www.w3.org/2000/svg"', ""))
    assert not any(re.search(r"(https?:)?//[\w.-]+\.\w+/", t) for t in texts), "the page loads nothing remote"
    # the page is open, the API behind it is not
    assert httpx.get(playground_server.url + "/v1/models").status_code == 401


def test_modes_map_to_the_api_and_tokens_navigate_by_keyboard(page, playground_server, scenario):
    server = playground_server
    open_page(page, server, scenario)
    modes = {
        1: ("add", 2.5),
        2: ("clamp", 6.0),
        3: ("scale", 1.5),
        5: ("ablate", None),
        6: ("logit bias", -3.0),
    }
    for index, (mode, value) in modes.items():
        page.get_by_label("feature", exact=True).fill(str(index))
        page.get_by_label("feature", exact=True).press("Enter")
        # the row is named "label (sae #index)" once the page has fetched the label, "sae #index" if none
        label = api(server, "GET", f"/v1/saes/{scenario.sae}/features/{index}")["label"]
        name = feature_name(scenario.sae, index, label)
        page.get_by_label(f"mode of {name}", exact=True).select_option(label=mode)
        if value is not None:
            box = page.get_by_label(re.compile(f"of {re.escape(name)} \\(number\\)$"))
            box.fill(str(value))
            box.press("Tab")
        if index == 1:  # the row's options: only where they differ from the API's defaults are they sent
            page.get_by_label(f"scale of {name}", exact=True).select_option("unit")
        if index == 2:
            page.get_by_label(f"positions of {name}", exact=True).select_option("prompt")
    prompt = page.get_by_role("textbox", name=re.compile("^Prompt"))
    prompt.fill(scenario.prompt)
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        generate(page, prompt)
    body = sent.value.post_data_json
    ref = lambda i: {"sae": scenario.sae, "index": i}  # noqa: E731
    assert body["steering"] == [
        {"feature": ref(1), "mode": "add", "strength": 2.5, "scale": "unit"},
        {"feature": ref(2), "mode": "clamp", "value": 6.0, "positions": "prompt"},
        {"feature": ref(3), "mode": "scale", "factor": 1.5},
        {"feature": ref(5), "mode": "ablate"},
    ]
    assert body["feature_logit_bias"] == [{"feature": ref(6), "strength": -3.0}]
    assert body["stream"] is True and body["return_unsteered"] is True
    assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"

    # arrow keys walk the tokens; a token's feature can become the colouring
    tokens = page.locator("#tokens")
    tokens.focus()
    tokens.press("ArrowRight")
    tokens.press("ArrowRight")
    assert page.locator("#token-detail p").inner_text().startswith("Token 1 ")
    assert tokens.get_attribute("aria-activedescendant") == "token-1"
    first = page.locator("#token-detail li").first
    index = int(re.search(r"#(\d+)", first.inner_text()).group(1))
    first.get_by_role("button", name=re.compile("^Colour by")).click()
    assert page.get_by_label("Colour by feature").input_value() == f"{scenario.sae}|{index}"
    page.locator("#activation-note", has_text=f"{scenario.sae} #{index},").wait_for()


def test_stop_when_ends_the_steered_stream_as_the_api_does(page, playground_server, scenario):
    server = playground_server
    open_page(page, server, scenario)
    search_and_add(page, scenario.query, scenario.feature)
    # a ReLU feature is never below 0: "above -1" holds at the first generated token, whatever the text
    page.get_by_label("stop when").select_option(label=scenario.feature)
    page.get_by_label("is above").fill("-1")
    page.get_by_label("temperature").fill("0")
    prompt = page.get_by_role("textbox", name=re.compile("^Prompt"))
    prompt.fill(scenario.prompt)
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        generate(page, prompt)
    body = sent.value.post_data_json
    sae, index = _feature_ref(scenario.feature)
    assert body["stop_when"] == [{"feature": {"sae": sae, "index": index}, "above": -1}]

    choices = api(server, "POST", "/v1/completions", json={**body, "stream": False})["choices"]
    steered = next(c for c in choices if c["steered"])
    twin = next(c for c in choices if not c["steered"])  # the unsteered twin runs without stop_when
    assert steered["finish_reason"] == "feature_stop" and twin["finish_reason"] != "feature_stop"
    note = page.locator("#stop-steered")
    assert note.is_visible() and f"position {steered['feature_stop']['position']}" in note.inner_text()
    assert page.locator("#stop-unsteered").is_hidden()
    assert page.locator("#out-steered").inner_text() == steered["text"]
    assert page.locator("#out-unsteered").inner_text() == twin["text"]
