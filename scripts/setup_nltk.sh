#!/usr/bin/env bash
# Prepare NLTK's WordNet offline: nltk.download cannot reach its server here.
# WordNet 3.0 comes from Debian's wordnet-base / wordnet-sense-index; the files
# are copied (nltk's path sandbox refuses symlinks) and `lexnames`, which Debian
# does not ship, is rebuilt from its man page.
set -euo pipefail
dest="${1:?usage: setup_nltk.sh NLTK_DATA_DIR}/corpora/wordnet"
src=/usr/share/wordnet
if [ ! -f "$src/data.noun" ] || [ ! -f "$src/cntlist" ]; then
  echo "setup_nltk: installing Debian's wordnet-base and wordnet-sense-index" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    wordnet-base wordnet-sense-index >/dev/null
fi
mkdir -p "$dest"
cp -f "$src"/* "$dest"/
man=/usr/share/man/man5/lexnames.5WN.gz
if [ -f "$man" ]; then
  # Table rows look like "05<TAB>noun.animal<TAB>nouns denoting animals".
  zcat "$man" | awk -F'\t' '/^[0-9][0-9]\t[a-z]+\.[A-Za-z]+/ {
      split($2, p, "."); c = (p[1]=="noun") ? 1 : (p[1]=="verb") ? 2 : (p[1]=="adj") ? 3 : 4;
      gsub(/[ ]+$/, "", $2); printf "%s\t%s\t%d\n", $1, $2, c }' > "$dest/lexnames"
fi
if [ "$(wc -l < "$dest/lexnames" 2>/dev/null || echo 0)" -lt 45 ]; then
  echo "setup_nltk: could not build $dest/lexnames (need 45 lines)" >&2
  exit 1
fi
echo "setup_nltk: WordNet ready in $dest"
