"""The playground's small things (issue 25, items 3 and 8): no 404 on load, the slider's range follows
the add scale, focus kept after a change, input checked before a request, a variant applied once."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import httpx

from tests.playground.conftest import API_KEY
from tests.playground.test_core_task import add_top_hit
from tests.playground.test_playground import _feature_ref, api, feature_name, generate, open_page


def test_no_failed_request_on_load(page, playground_server, scenario):
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status == 404 else None)
    open_page(page, playground_server, scenario)
    page.wait_for_load_state("networkidle")
    assert failed == []
    # the icon the page declares, and the one browsers ask for whatever the page says
    icon = page.locator("link[rel=icon]").get_attribute("href")
    for path in (icon, "/favicon.ico"):
        r = httpx.get(playground_server.url + path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml", path


def test_an_add_pressed_while_the_registry_loads_waits_for_it(page, playground_server, scenario):
    """Enter in the by-index box before GET /v1/saes has answered adds the feature once it has (the
    page once said "no SAE is registered on this server"); "serving <model>" shows only when the
    pickers are filled, so it means the page is ready."""
    server = playground_server
    held = []  # the keyed GET /v1/saes, answered only when the test lets it through
    page.route(
        "**/v1/saes", lambda r: held.append(r) if r.request.headers.get("authorization") else r.continue_()
    )
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(API_KEY)
    with page.expect_response(lambda r: r.url.endswith("/v1/models") and r.status == 200):
        page.get_by_label("API key").press("Enter")
    page.wait_for_timeout(300)  # time for the page to act on the models (a check that it did not)
    assert len(held) == 1
    assert page.locator("#model-name").inner_text() == ""
    page.get_by_label("feature", exact=True).fill("1")
    page.get_by_label("feature", exact=True).press("Enter")
    held[0].continue_()
    page.locator("#model-name", has_text=scenario.model_name).wait_for()
    label = api(server, "GET", f"/v1/saes/{scenario.sae}/features/1")["label"]
    page.get_by_label(f"mode of {feature_name(scenario.sae, 1, label)}", exact=True).wait_for()
    assert page.locator("#error").is_hidden()


def test_an_add_before_the_key_names_the_key(page, playground_server):
    """Without a key the registry cannot load: Add by index says so (the server's 401 and where the key
    goes), not "no SAE is registered on this server"."""
    page.goto(playground_server.url + "/")
    page.locator("#error", has_text="enter the key").wait_for()  # the page's own load, refused
    page.get_by_role("button", name="Dismiss the error").click()
    page.get_by_label("feature", exact=True).fill("1")
    page.get_by_label("feature", exact=True).press("Enter")
    error = page.locator("#error", has_text="enter the key at the top of the page")
    error.wait_for()
    assert "no SAE is registered" not in error.inner_text()


def test_slider_follows_the_scale_and_focus_stays(page, playground_server, scenario):
    open_page(page, playground_server, scenario)
    name = add_top_hit(page, scenario)
    slider = page.get_by_label(f"strength of {name}", exact=True)
    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("step")) == (
        "-10",
        "10",
        "0.25",
    )
    slider.focus()
    page.keyboard.press("ArrowRight")  # one key press is one step
    assert page.get_by_label(f"strength of {name} (number)").input_value() == "4.25"
    scale = page.get_by_label(f"scale of {name}", exact=True)
    scale.select_option("raw")
    assert (slider.get_attribute("max"), slider.get_attribute("step")) == ("20", "0.5")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == f"scale of {name}"
    page.get_by_label(f"mode of {name}", exact=True).select_option("clamp")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == f"mode of {name}"


def test_bad_input_is_named_before_any_request(page, playground_server, scenario):
    open_page(page, playground_server, scenario)
    option = page.locator("#index-sae option").first
    option.wait_for(state="attached")
    d_sae = int(re.search(r", (\d+)\)$", option.inner_text().strip()).group(1))
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/features/" in r.url else None)
    page.get_by_label("feature", exact=True).fill(str(d_sae))
    page.get_by_label("feature", exact=True).press("Enter")
    error = page.locator("#error")
    error.filter(has_text=f"0..{d_sae - 1}").wait_for()
    assert sent == [] and page.locator("#steering-list li").count() == 0
    # an id the pattern refuses replaces the older, unrelated error with its own
    page.get_by_label("Save the current set as variant").fill("-bad id")
    page.get_by_role("button", name="Save variant").click()
    error.filter(has_text='variant id "-bad id"').wait_for()
    assert f"0..{d_sae - 1}" not in error.inner_text()


def test_a_variant_is_applied_once(page, playground_server, scenario):
    """Loading a variant's rows while its model is chosen would apply it twice: the model goes back to
    the base, and the page says why; the rows come as one group."""
    open_page(page, playground_server, scenario)
    variant_model = f"{scenario.model_name}:{scenario.variant}"
    page.get_by_label("Model").select_option(variant_model)
    page.get_by_label("Variant", exact=True).select_option(scenario.variant)
    page.get_by_role("button", name="Load").click()
    page.locator("#model-note", has_text=f'applies variant "{scenario.variant}"').wait_for()
    assert page.get_by_label("Model").input_value() == scenario.model_name
    assert page.locator("#steering-list > li").count() == 1  # one group
    page.locator("#steering-list summary").click()
    assert page.locator("#steering-list .steer-row").first.is_visible()
    page.get_by_role("button", name=f"Remove variant group {scenario.variant}").click()
    assert page.locator("#steering-list li").count() == 0
    assert page.evaluate("document.activeElement.id") == "feature-query"


def test_stop_when_takes_any_feature_by_index(page, playground_server, scenario):
    """Not only a steered feature: any feature of the SAE, by index (a ReLU feature is never below 0,
    so "above -1" stops at the first generated token)."""
    open_page(page, playground_server, scenario)
    add_top_hit(page, scenario)
    page.get_by_label("stop when").select_option(label=f"another feature of {scenario.sae} (by index)")
    page.get_by_label("feature index").fill("5")
    page.get_by_label("is above").fill("-1")
    prompt = page.get_by_role("textbox", name=re.compile("^Prompt"))
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        generate(page, prompt)
    assert sent.value.post_data_json["stop_when"] == [
        {"feature": {"sae": scenario.sae, "index": 5}, "above": -1}
    ]
    note = page.locator("#stop-steered")
    assert note.is_visible() and f"{scenario.sae} #5 was" in note.inner_text()


def test_search_by_effect(page, playground_server, scenario):
    """`promotes=` from the page: the hits the API returns, each with its card's numbers."""
    server = playground_server
    sae, index = _feature_ref(scenario.feature)
    top = api(server, "GET", f"/v1/saes/{sae}/features/{index}")["top_logits"]["promoted"][0]
    # its text, or its id where the text is a byte fragment (random GPT-2)
    token = top["token"] if "\ufffd" not in top["token"] else str(top["token_id"])
    open_page(page, server, scenario)
    page.get_by_label("search by").select_option("promotes")
    page.get_by_label("Search features", exact=True).fill(token)
    with page.expect_request(lambda r: "/v1/features/search?" in r.url) as sent:
        page.get_by_label("Search features", exact=True).press("Enter")
    assert sent.value.url.split("promotes=")[1].split("&")[0] == quote(token, safe="")
    expected = api(server, "GET", "/v1/features/search", params={"promotes": token, "limit": 8})["data"]
    hits = page.locator("#search-results li.hit")
    hits.nth(len(expected) - 1).wait_for()
    assert hits.count() == len(expected) > 0
    first = expected[0]
    label = (
        f"{first['label']} ({first['sae']} #{first['index']})"
        if first["label"]
        else f"{first['sae']} #{first['index']}"
    )
    assert hits.first.locator("strong").inner_text() == label
    hits.first.locator("text=max activation").wait_for()  # its card's numbers came in


def test_variants_overwrite_export_delete(page, playground_server, scenario):
    server = playground_server
    open_page(page, server, scenario)
    name = add_top_hit(page, scenario)
    save_box = page.get_by_label("Save the current set as variant")
    save_box.fill("pg-over")
    page.get_by_role("button", name="Save variant").click()
    page.locator("#variant-saved", has_text='Saved variant "pg-over"').wait_for()
    # the same id again: refused, and the page says how to replace it
    page.get_by_role("button", name="Save variant").click()
    page.locator("#error", has_text='tick "overwrite"').wait_for()
    box = page.get_by_label(f"strength of {name} (number)")
    box.fill("2.5")
    box.press("Tab")
    page.get_by_label("overwrite a variant of the same id").check()
    page.locator("#variant-saved").evaluate("p => (p.textContent = '')")
    page.get_by_role("button", name="Save variant").click()
    page.locator("#variant-saved", has_text='Saved variant "pg-over"').wait_for()
    stored = api(server, "GET", "/v1/variants/pg-over")
    assert [s["strength"] for s in stored["steering"]] == [2.5]
    # export: the spec as POST /v1/variants takes it
    page.get_by_label("Variant", exact=True).select_option("pg-over")
    page.get_by_role("button", name="Export").click()
    exported = page.locator("#variant-out pre").inner_text()
    assert json.loads(exported) == {k: v for k, v in stored.items() if k not in ("object", "created")}
    # delete, after the page asks
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete").click()
    page.locator("#variant-out", has_text='Deleted variant "pg-over"').wait_for()
    assert httpx.get(server.url + "/v1/variants/pg-over", headers=server.headers).status_code == 404
    assert page.locator("#variant-select option[value='pg-over']").count() == 0


def test_token_logprobs_of_both_texts(page, playground_server, scenario):
    """Each text's generated tokens with their log-probabilities, as the API returns them for the call."""
    server = playground_server
    open_page(page, server, scenario)
    add_top_hit(page, scenario)
    prompt = page.get_by_role("textbox", name=re.compile("^Prompt"))
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        generate(page, prompt)
    body = sent.value.post_data_json
    assert body["logprobs"] == 1
    choices = api(server, "POST", "/v1/completions", json={**body, "stream": False})["choices"]
    for choice in choices:
        key = "steered" if choice["steered"] else "unsteered"
        spans = page.locator(f"#lp-{key} .token")
        shown = spans.evaluate_all("spans => spans.map(s => [s.textContent, Number(s.dataset.logprob)])")
        expected = choice["logprobs"]
        assert [t for t, _ in shown] == [t.replace("\n", "\u21b5\n") or "\u2205" for t in expected["tokens"]]
        assert [v for _, v in shown] == [round(v, 4) for v in expected["token_logprobs"]]
        mean = sum(expected["token_logprobs"]) / len(expected["token_logprobs"])
        assert f"mean {mean:.2f}" in page.locator(f"#lp-{key}-summary").inner_text()


def test_multi_turn_chat_keeps_two_conversations(page, playground_server, scenario):
    """Continuing a chat: the steered side goes on from its own replies with the steering, the unsteered
    side from its own replies without it; earlier turns show above each side's latest reply."""
    server = playground_server
    open_page(page, server, scenario)
    add_top_hit(page, scenario)
    page.get_by_label("chat", exact=True).check()
    page.get_by_label("continue this chat").check()
    prompt = page.get_by_role("textbox", name=re.compile("^Prompt"))
    sent: list[dict] = []
    page.on(
        "request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    )
    prompt.fill(scenario.prompt)
    generate(page, prompt)
    first = {k: page.locator(f"#out-{k}").inner_text() for k in ("steered", "unsteered")}
    assert prompt.input_value() == ""  # ready for the next message
    prompt.fill(scenario.prompt)
    generate(page, prompt)
    assert len(sent) == 3  # turn 1: one call with its twin; turn 2: one call per side
    steered_call = next(b for b in sent[1:] if "steering" in b)
    unsteered_call = next(b for b in sent[1:] if "steering" not in b)
    user = {"role": "user", "content": scenario.prompt}
    for side, call in (("steered", steered_call), ("unsteered", unsteered_call)):
        assert call["messages"] == [user, {"role": "assistant", "content": first[side]}, user]
        assert not call.get("return_unsteered")
        reply = api(server, "POST", "/v1/chat/completions", json={**call, "stream": False})["choices"][0]
        assert page.locator(f"#out-{side}").inner_text() == reply["message"]["content"]
        transcript = page.locator(f"#transcript-{side} .turn").all_inner_texts()
        assert transcript == [f"you (1) {scenario.prompt}", first[side]]
    assert unsteered_call["model"] == scenario.model_name
    # a new chat starts again from one turn
    page.get_by_role("button", name="New chat").click()
    assert page.locator("#transcript-steered").is_hidden()
