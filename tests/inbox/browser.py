"""The provider inbox in a real browser (Debian chromium, driven by selenium), by keyboard
alone, with axe-core run on every page.

Usage: browser.py BASE EMAIL PASSWORD TOTP_SECRET TASK_ID AXE_JS SCREENSHOT_DIR SERVICE_ID

Signs in (password, then the TOTP code), finds the referral in the queue, opens it, accepts
it, records a contact, records SWEMWBS 99 (and checks the message beside the field), then
24, and completes it. Then, from the queue's link, it opens the group's services, saves one
without a choice (the message is beside the radios), and sets SERVICE_ID (Crafts Circle) to
"full" with the arrow keys. Every page is checked with axe-core (WCAG 2.0/2.1/2.2 A and AA): no
violations. The queue and the referral are also checked at a phone's width and at 200%
zoom (1280 px / 2): no sideways scrolling. Screenshots of the queue and the referral are
written to SCREENSHOT_DIR. Prints one line per check; exits non-zero on the first failure.
The browser, axe and keyboard helpers are in pagecheck.py, beside this script.
"""

import json
import os
import sys
import time

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagecheck import Browser, by_id, fail, link_to, totp  # noqa: E402  (beside this script)

BASE, EMAIL, PASSWORD, SECRET, TASK, AXE_JS, SHOTS, SERVICE = sys.argv[1:9]


b = Browser(BASE, AXE_JS, SHOTS)
driver = b.driver

try:
    driver.get(BASE + "/inbox/sign-in")
    b.axe_finds_a_planted_fault()
    b.start_at("/inbox")
    if "/inbox/sign-in" not in driver.current_url:
        fail("the queue did not send an unsigned browser to sign in")
    b.axe("sign-in")
    b.type_into("email", EMAIL)
    b.type_into("password", PASSWORD)
    b.press("Continue")
    if "/inbox/sign-in/code" not in driver.current_url:
        fail(f"password step went to {driver.current_url}")
    b.axe("security code")
    # A wrong code first: the message is beside the field, and the page still passes axe.
    b.focused().send_keys(Keys.TAB)
    b.type_into("code", "000000")
    b.press("Continue")
    if "code-error" not in driver.page_source:
        fail("a wrong code shows no message beside the field")
    b.axe("security code, wrong code")
    b.type_into("code", totp(SECRET))
    b.press("Continue")
    if not driver.current_url.rstrip("/").endswith("/inbox"):
        fail(f"code step went to {driver.current_url}")

    b.axe("queue")
    if "Ada Example" not in driver.page_source:
        fail("the queue does not show the routed referral")
    b.screenshot("queue.png")
    b.no_sideways_scroll("queue")
    b.start_at("/inbox")
    link = b.tab_to(link_to(TASK), "the referral's link")
    link.send_keys(Keys.ENTER)
    time.sleep(0.3)
    if TASK not in driver.current_url:
        fail("Enter on the referral's link did not open it")
    b.axe("referral (new)")
    if "<script>alert" not in driver.find_element(By.TAG_NAME, "main").text:
        fail("the GP's notes (which hold markup) are not shown as text")
    b.screenshot("referral.png")
    b.no_sideways_scroll("referral")

    b.start_at(f"/inbox/referrals/{TASK}")
    b.press("Accept this referral")
    if "You accepted this referral" not in driver.page_source:
        fail("accept did not say it was done")
    b.axe("referral (accepted)")

    b.start_at(f"/inbox/referrals/{TASK}")
    b.type_into("contact-date", "21/11/2026")
    el = b.tab_to(by_id("contact-attempted"), "the contact radios")
    el.send_keys(Keys.ARROW_DOWN)  # radios move by arrow keys
    if not driver.find_element(By.ID, "contact-made").is_selected():
        fail("arrow key did not choose 'We spoke to them'")
    b.press("Record contact")
    if "Contact recorded" not in driver.page_source:
        fail("contact was not recorded")

    b.start_at(f"/inbox/referrals/{TASK}")
    b.type_into("score", "99")
    b.press("Record score")
    err = driver.find_elements(By.ID, "score-error")
    if not err or "from 7 to 35" not in err[0].text:
        fail("score 99 was not refused beside its field")
    b.axe("referral (score refused)")
    b.screenshot("score-refused.png")
    b.type_into("score", "24")
    b.press("Record score")
    if "Score recorded" not in driver.page_source:
        fail("score 24 was not recorded")

    b.start_at(f"/inbox/referrals/{TASK}")
    b.press("Mark as complete")
    if "The referral is complete" not in driver.page_source:
        fail("complete did not say it was done")
    b.axe("referral (completed)")

    b.start_at("/inbox")
    link = b.tab_to(link_to("/inbox/services"), "the services link")
    link.send_keys(Keys.ENTER)
    time.sleep(0.3)
    if not driver.current_url.endswith("/inbox/services"):
        fail(f"Enter on the services link went to {driver.current_url}")
    b.axe("services")
    b.no_sideways_scroll("services")
    b.start_at("/inbox/services")
    b.press("Save for Nelson Choir")
    err = [e.text for e in driver.find_elements(By.CLASS_NAME, "nhsuk-error-message")]
    if not any("Choose whether the service can take new referrals" in e for e in err):
        fail("saving with no choice shows no message beside the radios")
    b.axe("services (no choice)")
    b.start_at("/inbox/services")
    el = b.tab_to(by_id(f"status-{SERVICE}"), "Crafts Circle's radios")
    el.send_keys(Keys.SPACE)
    el.send_keys(Keys.ARROW_DOWN)
    b.focused().send_keys(Keys.ARROW_DOWN)
    if not driver.find_element(By.ID, f"status-{SERVICE}-no-capacity").is_selected():
        fail("the arrow keys did not choose 'No, it is full'")
    b.press("Save for Crafts Circle")
    if "Crafts Circle is now shown as \u201cFull\u201d" not in driver.page_source:
        fail("saving 'full' did not say it was done")
    b.axe("services (saved)")
    b.screenshot("services.png")
    print(json.dumps({"ok": True, "pages_checked": b.checked}), flush=True)
finally:
    b.quit()
