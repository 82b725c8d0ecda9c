#!/usr/bin/env bash
# Builds the pipeline CLI at each revision given, for an A/B comparison of
# decoding speed on a GPU machine without Go (scripts/ab-generate.sh runs
# there). A revision is anything git names ("main", "HEAD~2", a hash) or
# "." for the work tree as it is, changes included; the first is the
# baseline the others are compared against.
#
#   scripts/ab-build.sh main .          # here: bin/ab/builds.tar.xz and bin/ab/ab-generate.sh
#   bin/ab/ab-generate.sh               # there, from a copy of the repository that holds bin/ab
#
# With the last revision's builds go its decoding tests (trainer/gpu and
# its kernels package, as test binaries), which ab-generate.sh runs first.
# The builds are packed with xz: builds of nearby revisions share most of
# their bytes, so four of them and the tests fit the device's carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || {
	echo "usage: scripts/ab-build.sh BASE REVISION..." >&2
	exit 2
}
export CGO_ENABLED=0 GOOS=linux GOARCH="${GOARCH:-amd64}"
root=$(pwd)
out=$root/bin/ab
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; git -C "$root" worktree prune' EXIT
rm -rf "$out"
mkdir -p "$out" "$tmp/builds"
: >"$tmp/builds/names.txt"
for rev in "$@"; do
	if [ "$rev" = . ]; then
		name=worktree
		src=$root
	else
		sha=$(git rev-parse --short=9 "$rev^{commit}")
		name=$(printf '%s' "$rev" | tr -c 'A-Za-z0-9._-' _)-$sha
		src=$tmp/src-$sha
		[ -d "$src" ] || git worktree add --quiet --detach "$src" "$sha"
	fi
	echo "building $rev as $name" >&2
	(cd "$src" && go build -trimpath -ldflags="-s -w" -o "$tmp/builds/$name" ./cmd/pipeline)
	echo "$name" >>"$tmp/builds/names.txt"
done
echo "building the tests of $rev" >&2
(cd "$src" && go test -c -trimpath -ldflags="-s -w" -o "$tmp/builds/gpu.test" ./trainer/gpu &&
	go test -c -trimpath -ldflags="-s -w" -o "$tmp/builds/kernels.test" ./trainer/gpu/kernels)
tar -C "$tmp" -cf - builds | xz -T0 --lzma2=preset=2,dict=192MiB >"$out/builds.tar.xz"
cp scripts/ab-generate.sh "$out/"
ls -l "$out" >&2
