"""The core task of the playground at its defaults (issue 25): search a concept, add the top hit,
Generate, see what changed. In a real headless Chromium against the real server (the demo by default,
whose ground truth is the corpus' cold-weather vocabulary)."""

from __future__ import annotations

import re

from steerserve.demo.corpus import weather_vocabulary
from tests.playground.conftest import API_KEY
from tests.playground.test_playground import api, generate, open_page

COLD = weather_vocabulary("cold")  # the demo's ground truth: the words of its cold climate


def cold_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) & COLD


def divergence(a: str, b: str) -> int:
    """Where two texts part: their common prefix, backed up to the start of the word it cuts."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and not a[k - 1].isspace():
        k -= 1
    return k


def prompt_box(page):
    return page.get_by_role("textbox", name=re.compile("^Prompt"))


def add_top_hit(page, scenario):
    """Search the scenario's concept and press the first hit's Add; returns the row's name."""
    page.get_by_label("Search features", exact=True).fill(scenario.query)
    page.get_by_label("Search features", exact=True).press("Enter")
    add = page.locator("#search-results").get_by_role("button", name=re.compile("^Add ")).first
    name = add.get_attribute("aria-label").removeprefix("Add ")
    add.click()
    page.locator("#steering-list .steer-row .basis").wait_for()
    return name


def outputs(page) -> tuple[str, str]:
    return page.locator("#out-steered").inner_text(), page.locator("#out-unsteered").inner_text()


def test_core_task_at_the_defaults(page, playground_server, scenario, screenshots):
    """Search, add the top hit, Generate at the page's defaults: over seeds 1..5 the steered text differs
    from its twin and (on the demo) says a cold-weather word in at least 4; where they part is marked."""
    server = playground_server
    open_page(page, server, scenario)
    assert prompt_box(page).input_value() == scenario.prompt  # the page's default prompt
    name = add_top_hit(page, scenario)
    sae, index = re.search(r"\((\S+) #(\d+)\)$", name).groups()
    info = api(server, "GET", f"/v1/saes/{sae}/features/{index}")
    # the default strength is scaled by the feature's recorded max activation, and the row says so
    assert page.get_by_label(f"scale of {name}", exact=True).input_value() == "max_activation"
    basis = page.locator("#steering-list .basis").inner_text()
    assert f"max activation {info['max_activation']:.4g}" in basis, basis
    # the new row is scrolled to and highlighted
    assert page.locator("#steering-list .steer-row.flash").count() == 1
    # adding it again merges: one row, and a note saying so
    page.locator("#search-results").get_by_role("button", name=f"Add {name}", exact=True).click()
    page.locator("#steering-note", has_text="already in the set").wait_for()
    assert page.locator("#steering-list .steer-row").count() == 1

    said, said_unsteered, differ = 0, 0, 0
    for seed in range(1, 6):
        page.get_by_label("seed").fill(str(seed))
        with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
            generate(page, prompt_box(page))
        steering = sent.value.post_data_json["steering"]
        assert steering == [
            {
                "feature": {"sae": sae, "index": int(index)},
                "mode": "add",
                "strength": 4,
                "scale": "max_activation",
            }
        ]
        steered, unsteered = outputs(page)
        if steered == unsteered:
            continue
        differ += 1
        said += bool(cold_words(steered))
        said_unsteered += bool(cold_words(unsteered))
        # the highlight starts where the two texts part, in both columns
        at = divergence(steered, unsteered)
        assert page.locator("#out-steered mark.diverge").inner_text() == steered[at:]
        assert page.locator("#out-unsteered mark.diverge").inner_text() == unsteered[at:]
        assert page.locator("#compare-note", has_text=f"part at character {at}").is_visible()
    screenshots(page, "core-task")
    assert differ >= 4, f"steered equals unsteered in {5 - differ} of 5 seeds"
    if scenario.steered_reads_as_meant is not None:  # the demo: its text means something
        assert said >= 4 and said > said_unsteered, (said, said_unsteered)


def test_identical_outputs_say_so(page, playground_server, scenario):
    """A multiplier of 0 steers nothing: the page says the two texts are identical and what to try."""
    open_page(page, playground_server, scenario)
    add_top_hit(page, scenario)
    page.get_by_label("global strength multiplier", exact=True).fill("0")
    page.get_by_label("global strength multiplier", exact=True).press("Tab")
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        generate(page, prompt_box(page))
    assert sent.value.post_data_json["steering"][0]["strength"] == 0
    steered, unsteered = outputs(page)
    assert steered == unsteered
    note = page.locator("#compare-note")
    assert note.is_visible() and "identical" in note.inner_text() and "multiplier" in note.inner_text()
    assert page.locator("mark.diverge").count() == 0
    # back to x1: the texts part and the notice says where
    page.get_by_label("global strength multiplier", exact=True).fill("1")
    page.get_by_label("global strength multiplier", exact=True).press("Tab")
    generate(page, prompt_box(page))
    assert "identical" not in note.inner_text() and page.locator("mark.diverge").count() == 2


def test_a_run_reloads_from_its_link(page, chromium, playground_server, scenario):
    """The link carries the run: a fresh tab shows its outputs (before any key), and Generate there
    reruns it to the same texts (seeded)."""
    server = playground_server
    open_page(page, server, scenario)
    add_top_hit(page, scenario)
    page.get_by_label("seed").fill("3")
    page.get_by_label("temperature").fill("0.9")
    generate(page, prompt_box(page))
    saved = outputs(page)
    page.get_by_role("button", name="Link to this run").click()
    link = page.get_by_label("Link to this run (copy it)").input_value()
    assert link.startswith(server.url + "/#run=")

    other = chromium.new_context(viewport={"width": 1280, "height": 1000})
    try:
        fresh = other.new_page()
        errors: list[str] = []
        fresh.on("pageerror", lambda exc: errors.append(str(exc)))
        fresh.goto(link)
        fresh.locator("#out-steered", has_text=saved[0].strip()[:10]).wait_for()
        assert outputs(fresh) == saved
        assert fresh.get_by_label("seed").input_value() == "3"
        assert fresh.get_by_label("temperature").input_value() == "0.9"
        assert fresh.locator("#steering-list .steer-row").count() == 1
        fresh.get_by_label("API key").fill(API_KEY)
        fresh.get_by_label("API key").press("Enter")
        fresh.locator("#model-name", has_text=scenario.model_name).wait_for()
        generate(fresh, prompt_box(fresh))
        assert outputs(fresh) == saved
        assert not errors, errors
    finally:
        other.close()


def test_phone_width_has_no_overflow_and_the_core_task_is_reachable(
    chromium, playground_server, scenario, screenshots
):
    context = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(45_000)
    try:
        open_page(page, playground_server, scenario)
        overflow = "[document.documentElement.scrollWidth, window.innerWidth]"
        width, inner = page.evaluate(overflow)
        assert width <= inner, (width, inner)
        # the prompt and outputs come first; the settings start folded away
        prompt_top = prompt_box(page).bounding_box()["y"]
        assert prompt_top < page.locator("#steering-panel").bounding_box()["y"]
        assert page.get_by_label("temperature").is_hidden()

        def tap(locator):
            locator.scroll_into_view_if_needed()
            box = locator.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= inner, box
            locator.tap()

        page.get_by_label("Search features", exact=True).fill(scenario.query)
        tap(page.locator("#search-form").get_by_role("button", name="Search"))
        add = page.locator("#search-results").get_by_role("button", name=re.compile("^Add ")).first
        name = add.get_attribute("aria-label").removeprefix("Add ")
        tap(add)
        tap(page.get_by_role("button", name=f"Remove {name}"))  # reachable too; then add it back
        tap(add)
        for control in (f"strength of {name}", f"mode of {name}", "global strength multiplier"):
            box = page.get_by_label(control, exact=True).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= inner, (control, box)
        tap(page.get_by_role("button", name="Generate"))
        page.locator("#generate:enabled").wait_for(timeout=120_000)
        page.locator("#tokens .token").first.wait_for()
        steered, unsteered = outputs(page)
        assert steered and steered != unsteered
        for out in ("#out-steered", "#out-unsteered"):
            box = page.locator(out).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= inner, (out, box)
        width, inner = page.evaluate(overflow)
        screenshots(page, "phone-390")
        assert width <= inner, (width, inner)
    finally:
        context.close()


def test_keyboard_only_core_task(page, playground_server, scenario):
    """The key, the search, Add and Generate with the keyboard alone; Remove keeps the focus on the page."""
    page.goto(playground_server.url + "/")
    page.locator("#error").wait_for()  # the 401 before a key: the focus goes to the key field

    def tab_to(predicate: str, limit: int = 80) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate(f"(() => {{ const a = document.activeElement; return {predicate}; }})()"):
                return
        raise AssertionError(f"Tab never reached {predicate}")

    if page.evaluate("document.activeElement.id") != "api-key":
        tab_to("a.id === 'api-key'")
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    page.locator("#model-name", has_text=scenario.model_name).wait_for()
    tab_to("a.id === 'feature-query'")
    page.keyboard.type(scenario.query)
    page.keyboard.press("Enter")
    page.locator("#search-results li.hit").first.wait_for()
    tab_to("(a.getAttribute('aria-label') || '').startsWith('Add ') && a.closest('#search-results') !== null")
    name = page.evaluate("document.activeElement.getAttribute('aria-label')").removeprefix("Add ")
    page.keyboard.press("Enter")
    page.locator("#steering-list .steer-row .basis").wait_for()
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == f"Add {name}"  # focus kept
    page.keyboard.press("Control+Enter")  # generates from anywhere
    page.locator("#tokens .token").first.wait_for(timeout=120_000)
    page.locator("#generate:enabled").wait_for()
    steered, unsteered = outputs(page)
    assert steered and steered != unsteered
    tab_to(f"a.getAttribute('aria-label') === 'Remove {name}'")
    page.keyboard.press("Enter")
    assert page.locator("#steering-list .steer-row").count() == 0
    assert page.evaluate("document.activeElement.id") == "feature-query"
