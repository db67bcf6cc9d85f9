#!/usr/bin/env bash
# Debian packages the evaluation and its tests need: Tesseract with the 32 benchmark languages, Noto fonts
# for the OCR cards, Chromium for the report screenshot test, PostgreSQL for the Prefect-at-scale test.
# Installs only what is missing. VISION_BRIDGE_RUNTIME_ONLY=1 (the Docker image) leaves out what only the tests
# use (Chromium, PostgreSQL); --print lists the packages and installs nothing.
set -euo pipefail
PACKAGES="tesseract-ocr fonts-noto-core fonts-noto-cjk"
[ "${VISION_BRIDGE_RUNTIME_ONLY:-0}" = "1" ] || PACKAGES="$PACKAGES chromium postgresql"
for lang in eng deu fra spa ita por nld pol ces tur vie ind swe hun ron rus ukr bul ell ara fas heb hin mar ben \
            tam tha kor jpn chi-sim chi-tra kat; do
  PACKAGES="$PACKAGES tesseract-ocr-$lang"
done
if [ "${1:-}" = "--print" ]; then
  echo $PACKAGES
  exit 0
fi
missing=""
for package in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
