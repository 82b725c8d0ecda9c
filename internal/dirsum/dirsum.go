// Package dirsum records the SHA-256 digests of a folder's files in a
// SHA256SUMS file (the format of sha256sum, so `sha256sum -c SHA256SUMS`
// checks it too) and verifies them. Training checkpoints carry one, so that
// a checkpoint damaged on disk is never resumed, and `pipeline verify`
// checks them beside the cache's entries.
package dirsum

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gemmaft/internal/atomicfile"
)

// File is the name of the digest list inside a folder.
const File = "SHA256SUMS"

// SetAsideFile, in a folder, says why it was set aside (found damaged and
// kept for inspection); Verify does not check such a folder again.
const SetAsideFile = "SET_ASIDE"

// Write hashes every regular file under dir (but File itself) and writes
// their digests to dir/File, atomically.
func Write(dir string) error {
	var lines []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(dir, path)
		rel = filepath.ToSlash(rel)
		if rel == File {
			return nil
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s is not a regular file", path)
		}
		sum, err := FileSum(path)
		if err != nil {
			return err
		}
		lines = append(lines, sum+"  "+rel+"\n")
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(lines)
	return atomicfile.WriteFile(filepath.Join(dir, File), []byte(strings.Join(lines, "")))
}

// ErrNoSums is returned by Verify for a folder without a digest list.
var ErrNoSums = errors.New("no " + File + " (written by an older version, or not complete)")

// Verify re-hashes the files dir/File lists and returns an error naming the
// first that is missing or differs; a folder without File is ErrNoSums.
func Verify(dir string) error {
	data, err := os.ReadFile(filepath.Join(dir, File))
	if errors.Is(err, fs.ErrNotExist) {
		return ErrNoSums
	}
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	n := 0
	for sc.Scan() {
		line := sc.Text()
		sum, name, ok := strings.Cut(line, "  ")
		if !ok || len(sum) != 64 || name == "" || strings.Contains(name, "..") || filepath.IsAbs(name) {
			return fmt.Errorf("%s: malformed line %q", File, line)
		}
		got, err := FileSum(filepath.Join(dir, filepath.FromSlash(name)))
		if err != nil {
			var pe *fs.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			return fmt.Errorf("%s: %w", name, err)
		}
		if got != sum {
			return fmt.Errorf("%s does not match its digest in %s (damaged on disk)", name, File)
		}
		n++
	}
	if n == 0 {
		return fmt.Errorf("%s lists no files", File)
	}
	return nil
}

// SetAside marks dir as set aside for why, so Verify-based scans skip it.
func SetAside(dir, why string) error {
	return atomicfile.WriteFile(filepath.Join(dir, SetAsideFile), []byte(why+"\n"))
}

// IsSetAside reports whether dir was set aside.
func IsSetAside(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, SetAsideFile))
	return err == nil
}

// FileSum is the hex sha256 of the file at path.
func FileSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
