"""The public self-referral page (/refer) in a real browser (Debian chromium, driven by
selenium), by keyboard alone, with axe-core run on every page.

Usage: refer_browser.py BASE AXE_JS SCREENSHOT_DIR

A person opens /refer, reads how their information is used (/refer/privacy) and comes back,
fills the form in with an impossible date of birth and no way to get in touch, and sends
it: the error summary heads the page, names both faults and links each to its field, and
the form keeps what was typed. They follow the first link, correct the form and send it
again: the confirmation shows a reference (SP-XXXX-XXXX) and nothing of what they typed,
and the address bar still says /refer, with nothing after it.

Every page is checked with axe-core (WCAG 2.0/2.1/2.2 A and AA): no violations; the form,
the form with its errors and the confirmation also at a phone's width and at 200% zoom: no
sideways scrolling. Screenshots refer-form.png, refer-errors.png (whole page) and
refer-done.png are written to SCREENSHOT_DIR. Prints one line per check, then a JSON line
with "ok": true, the reference and the person (for the test to find them over FHIR);
exits non-zero on the first failure. The helpers are in pagecheck.py, beside this script.
"""

import json
import os
import re
import sys
import time
from urllib.parse import quote_plus, urlsplit

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagecheck import Browser, button, by_id, fail, link_to  # noqa: E402  (beside this script)

BASE, AXE_JS, SHOTS = sys.argv[1:4]
REFERENCE = re.compile(r"\bSP-[A-Z0-9]{4}-[A-Z0-9]{4}\b")

# A synthetic person. The NHS number is from the 999 test range (fixtures/nhs-numbers.txt);
# the phone number is from Ofcom's range for drama; example.com is reserved.
PERSON = {
    "given_name": "Marigold",
    "family_name": "Tabwell",
    "dob": ("14", "8", "1949"),
    "postcode": "bb9 7sr",
    "phone": "01632 960 001",
    "email": "marigold.tabwell@example.com",
    "more": "Mornings are best. I used to sing in a choir on Tuesdays.",
    "nhs_number": "999 000 0018",
}
# What must not be on the confirmation page or in its address, in every form typed or shown.
PERSONAL = ["Marigold", "Tabwell", "1949", "BB9 7SR", "BB97SR", "01632", "960 001",
            "marigold.tabwell", "example.com", "choir", "Tuesdays", "Mornings",
            "9990000018", "999 000 0018"]


def ok(msg):
    print(f"ok: {msg}", flush=True)


b = Browser(BASE, AXE_JS, SHOTS)
driver = b.driver


def main_text():
    return driver.find_element(By.TAG_NAME, "main").text


def value(field_id):
    return driver.find_element(By.ID, field_id).get_attribute("value")


def space_on(field_id, what):
    """Tabs to a radio or checkbox and presses Space; it must then be chosen."""
    b.tab_to(by_id(field_id), what).send_keys(Keys.SPACE)
    if not driver.find_element(By.ID, field_id).is_selected():
        fail(f"Space did not choose {what}")


def follow(predicate, what):
    """Tabs to a link and presses Enter."""
    b.tab_to(predicate, what).send_keys(Keys.ENTER)
    time.sleep(0.3)


def at_refer(what):
    """The address is /refer exactly: no query string, no fragment."""
    url = urlsplit(driver.current_url)
    if url.path != "/refer" or url.query or url.fragment:
        fail(f"{what}: the address is {driver.current_url}, not {BASE}/refer")


try:
    # --- the form, as it first appears (nothing focused, for the screenshot) -------------
    driver.get(BASE + "/refer")
    if "Ask for help from a link worker" not in main_text():
        fail("/refer is not the self-referral form")
    if driver.title.startswith("Error"):
        fail(f"a fresh form's title says there is an error: {driver.title!r}")
    b.axe("refer form")
    b.screenshot("refer-form.png", full_page=True)
    b.no_sideways_scroll("refer form")
    ok("the form fits a phone's width and 200% zoom")
    # axe must find a fault planted in this very page, or its passes mean nothing.
    b.axe_finds_a_planted_fault()

    # How their information is used: a link in the form, and back again (the page is
    # loaded afresh, without the planted fault, and used by keyboard from here on).
    b.start_at("/refer")
    follow(link_to("/refer/privacy"), "the link to how information is used")
    if urlsplit(driver.current_url).path != "/refer/privacy":
        fail(f"Enter on the privacy link went to {driver.current_url}")
    if "How we use your information" not in main_text():
        fail("/refer/privacy does not say how information is used")
    b.axe("privacy")
    b.from_top("/refer/privacy")
    follow(lambda el: el.tag_name == "a" and el.text.strip() == "Back to the form", "'Back to the form'")
    at_refer("'Back to the form'")
    ok("the privacy notice is reached from the form and leads back to it")

    # --- a first try, with faults: an impossible date of birth, and no phone or email --------
    b.from_top("/refer")
    token = driver.find_element(By.NAME, "token").get_attribute("value")
    space_on("for_whom-me", "'I would like help for myself'")
    b.type_into("given_name", PERSON["given_name"])
    b.type_into("family_name", PERSON["family_name"])
    b.type_into("dob_day", "31")
    b.type_into("dob_month", "2")
    b.type_into("dob_year", PERSON["dob"][2])
    b.type_into("postcode", PERSON["postcode"])
    space_on("need-loneliness", "the need 'loneliness'")
    space_on("need-low-confidence", "the need 'low confidence'")
    b.type_into("more", PERSON["more"])
    b.type_into("nhs_number", PERSON["nhs_number"])
    # The GP practice: a closed select moves to the next option on the down arrow.
    b.tab_to(by_id("practice"), "the GP practice list").send_keys(Keys.ARROW_DOWN)
    practice = value("practice")
    if not practice:
        fail("the down arrow did not choose a GP practice")
    space_on("consent_share", "the consent to share")
    space_on("consent_gp", "the consent to tell the GP practice")
    b.press("Send")

    # --- the errors ---------------------------------------------------------------------
    at_refer("the form with errors")
    if not driver.title.startswith("Error: "):
        fail(f"the page with errors is not titled 'Error: …': {driver.title!r}")
    summary = driver.find_elements(By.CSS_SELECTOR, ".nhsuk-error-summary")
    if not summary:
        fail("no error summary after a form with faults")
    summary = summary[0]
    if summary.get_attribute("tabindex") != "-1" or summary.get_attribute("role") != "alert":
        fail("the error summary is not a focusable alert (tabindex=-1, role=alert)")
    heads = driver.execute_script(
        "const s = arguments[0], h1 = document.querySelector('main h1');"
        "return !!h1 && !!(s.compareDocumentPosition(h1) & Node.DOCUMENT_POSITION_FOLLOWING);", summary)
    if not heads:
        fail("the error summary does not come before the page's heading")
    if "There is a problem" not in summary.text:
        fail(f"the error summary has no title: {summary.text!r}")
    links = [(a.get_attribute("href").split("#", 1)[-1], a.text)
             for a in summary.find_elements(By.CSS_SELECTOR, "a")]
    if [f for f, _ in links] != ["dob_day", "phone"]:
        fail(f"the error summary names {links}, not the date of birth and the phone")
    if "real date of birth" not in links[0][1] or "phone number or an email" not in links[1][1]:
        fail(f"the error summary's messages: {links}")
    # Each fault is also beside its field, and the field is described by it.
    for field, error in [("dob_day", "dob-error"), ("phone", "phone-error")]:
        if not driver.find_elements(By.ID, field):
            fail(f"the error summary links to #{field}, which is not on the page")
        if not driver.find_elements(By.ID, error):
            fail(f"no message beside #{field}")
    dob_group = driver.find_element(By.CSS_SELECTOR, "fieldset[aria-describedby~='dob-error']")
    if not dob_group.find_elements(By.ID, "dob_day"):
        fail("the date of birth's message does not describe its fields")
    if "phone-error" not in (driver.find_element(By.ID, "phone").get_attribute("aria-describedby") or ""):
        fail("the phone's message does not describe the phone field")
    ok("the error summary heads the page and links each fault to its field")
    # What was typed is kept, to correct, on the same form.
    kept = [("given_name", PERSON["given_name"]), ("family_name", PERSON["family_name"]),
            ("postcode", PERSON["postcode"]), ("more", PERSON["more"]), ("practice", practice)]
    for field, typed in kept:
        if value(field) != typed:
            fail(f"#{field} lost what was typed: {value(field)!r}")
    if driver.find_element(By.NAME, "token").get_attribute("value") != token:
        fail("the form with errors is not the same form (its token changed)")
    # A control for the confirmation's check below: the same search finds them here.
    if not all(t.lower() in driver.page_source.lower() for t in ["Marigold", "Tabwell", "choir"]):
        fail("the search for what was typed does not find it on the form that holds it")
    ok("the form keeps what was typed")
    b.axe("refer form with errors")
    b.screenshot("refer-errors.png", full_page=True)
    b.no_sideways_scroll("refer form with errors")

    # By keyboard: the first links after the skip link and the header are the summary's,
    # and Enter on one puts the cursor in its field.
    b.from_top("the form with errors")
    b.focused().send_keys(Keys.TAB)  # the header's link
    b.focused().send_keys(Keys.TAB)
    first = b.focused()
    if not (first.get_attribute("href") or "").endswith("#dob_day"):
        fail(f"after the header, Tab does not reach the error summary: {first.text!r}")
    first.send_keys(Keys.ENTER)
    time.sleep(0.3)
    if b.focused().get_attribute("id") != "dob_day":
        fail(f"Enter on the summary's link did not move to #dob_day: {b.focused().get_attribute('id')!r}")
    ok("Enter on an error's link moves to its field")

    # --- corrected, and sent -----------------------------------------------------------
    day = b.focused()
    day.send_keys(Keys.CONTROL, "a")
    day.send_keys(PERSON["dob"][0])
    b.type_into("dob_month", PERSON["dob"][1])
    b.type_into("dob_year", PERSON["dob"][2])
    b.type_into("phone", PERSON["phone"])
    b.type_into("email", PERSON["email"])
    b.tab_to(button("Send"), "button 'Send'").send_keys(Keys.ENTER)
    time.sleep(0.5)

    # --- the confirmation --------------------------------------------------------------
    at_refer("the confirmation")
    text = main_text()
    if "Your request has been sent" not in text:
        fail(f"no confirmation after a good form: {text[:300]!r}")
    found = REFERENCE.findall(text)
    if len(set(found)) != 1:
        fail(f"the confirmation does not show one reference SP-XXXX-XXXX: {found}")
    reference = found[0]
    ok(f"the confirmation shows the reference {reference}")
    page = driver.page_source.lower()
    url = driver.current_url.lower()
    for typed in PERSONAL:
        for form in {typed.lower(), quote_plus(typed).lower()}:
            if form in page:
                fail(f"the confirmation shows what was typed: {typed!r}")
            if form in url:
                fail(f"the address holds what was typed: {typed!r} in {driver.current_url}")
    if driver.find_elements(By.CSS_SELECTOR, "form, input"):
        fail("the confirmation holds a form (which could keep what was typed)")
    ok("the confirmation and its address hold nothing that was typed")
    b.axe("confirmation")
    b.screenshot("refer-done.png")
    b.no_sideways_scroll("confirmation")

    d, m, y = PERSON["dob"]
    print(json.dumps({
        "ok": True,
        "reference": reference,
        "pages_checked": b.checked,
        "person": {
            "given_name": PERSON["given_name"],
            "family_name": PERSON["family_name"],
            "birth_date": f"{y}-{int(m):02d}-{int(d):02d}",
            "postcode": PERSON["postcode"].upper(),
            "nhs_number": PERSON["nhs_number"].replace(" ", ""),
            "practice": practice,
        },
    }), flush=True)
finally:
    b.quit()
