#!/usr/bin/env bash
# Headless Chromium and its matching chromedriver for tests/test_browser.py, from
# Debian's packages: the two come at the same version, and nothing is fetched at
# test time from hosts other than the package registries. Never fails the setup:
# where they cannot be installed the browser test skips and says why.
set -uo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser test: chromium and chromium-driver are missing and cannot be installed here" \
         "(needs root and apt-get); tests/test_browser.py will skip." \
         "Install them as root with: apt-get install chromium chromium-driver"
    exit 0
fi
echo "browser test: installing chromium and chromium-driver with apt-get"
# Chromium's other recommendations (udev, upower, a printer dialog) are for a
# desktop; fonts-liberation is kept so that the screenshot shows text, not boxes.
if ! { apt-get update -qq \
       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              chromium chromium-driver fonts-liberation >/dev/null; }; then
    echo "browser test: apt-get could not install chromium chromium-driver; tests/test_browser.py will skip."
fi
exit 0
