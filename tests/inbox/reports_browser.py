"""The commissioner's figures page in a real browser (Debian chromium, driven by selenium),
by keyboard alone, with axe-core run on every state of the page.

Usage: reports_browser.py BASE EMAIL PASSWORD TOTP_SECRET AXE_JS SCREENSHOT_DIR YEAR

Opens /reports unsigned (and is sent to sign in), signs in as the commissioner (password,
then the TOTP code) and lands on the figures. Checks the charts (SVG, named for assistive
technology), the tables and a suppressed cell; then at a phone's width and at 200% zoom: no
sideways scrolling. Chooses February to April of YEAR in the period picker with the arrow
keys in its selects, shows them, and saves a screenshot of the whole page (reports.png). Then
chooses a last month before the first: the message is in the error summary and beside the
picker. Every state passes axe-core (WCAG 2.0/2.1/2.2 A and AA). Prints one line per
check; exits non-zero on the first failure. Helpers are in pagecheck.py, beside this script.
"""

import json
import os
import sys
import time

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagecheck import Browser, by_id, fail, link_to, totp  # noqa: E402  (beside this script)

BASE, EMAIL, PASSWORD, SECRET, AXE_JS, SHOTS, YEAR = sys.argv[1:8]

b = Browser(BASE, AXE_JS, SHOTS)
driver = b.driver


def choose(select_id, words):
    """Tabs to the select and moves through its months with the arrow keys to `words`."""
    el = b.tab_to(by_id(select_id), f"#{select_id}")
    options = [o.text for o in Select(el).options]
    if words not in options:
        fail(f"#{select_id} does not offer {words!r}")
    for _ in range(len(options)):
        now = Select(driver.find_element(By.ID, select_id)).first_selected_option.text
        if now == words:
            return
        key = Keys.ARROW_DOWN if options.index(now) < options.index(words) else Keys.ARROW_UP
        b.focused().send_keys(key)
    fail(f"the arrow keys never reached {words!r} in #{select_id}")


try:
    driver.get(BASE + "/inbox/sign-in")
    b.axe_finds_a_planted_fault()
    b.start_at("/reports")
    if "/inbox/sign-in" not in driver.current_url:
        fail("the figures did not send an unsigned browser to sign in")
    b.type_into("email", EMAIL)
    b.type_into("password", PASSWORD)
    b.press("Continue")
    b.focused().send_keys("\t")
    b.type_into("code", totp(SECRET))
    b.press("Continue")
    if not driver.current_url.rstrip("/").endswith("/reports"):
        fail(f"a commissioner's sign-in went to {driver.current_url}, not the figures")

    b.axe("figures")
    charts = driver.find_elements(By.CSS_SELECTOR, "svg[role=img]")
    if len(charts) != 4 or not all(c.get_attribute("aria-label") for c in charts):
        fail(f"expected 4 named charts, found {len(charts)}")
    cells = driver.find_elements(By.XPATH, "//td[normalize-space()='suppressed']")
    if not driver.find_elements(By.TAG_NAME, "table") or not cells:
        fail("no tables, or no table cell reads 'suppressed' among the seeded months")
    b.no_sideways_scroll("figures")

    b.start_at("/reports")
    choose("from", f"February {YEAR}")
    choose("to", f"April {YEAR}")
    b.press("Show figures")
    if f"from={YEAR}-02&to={YEAR}-04" not in driver.current_url:
        fail(f"the picker went to {driver.current_url}")
    h = driver.find_element(By.TAG_NAME, "title").get_attribute("textContent")
    if f"February {YEAR} to April {YEAR}" not in h:
        fail(f"the title does not name the period: {h!r}")
    b.axe("figures (months chosen)")
    b.tab_to(link_to("/reports/uptake.csv"), "the uptake table's CSV link")
    b.screenshot("reports.png", full_page=True)

    b.start_at("/reports")
    choose("from", f"April {YEAR}")
    choose("to", f"February {YEAR}")
    b.press("Show figures")
    summary = driver.find_elements(By.CLASS_NAME, "nhsuk-error-summary")
    if not summary or "after it" not in summary[0].text:
        fail("a last month before the first shows no error summary")
    if "period-error" not in driver.page_source:
        fail("the message is not beside the picker")
    b.axe("figures (last month before first)")
    print(json.dumps({"ok": True, "pages_checked": b.checked}), flush=True)
finally:
    b.quit()
