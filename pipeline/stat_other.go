//go:build !linux && !darwin

package pipeline

import "io/fs"

// stateOf without ctime or inode: size and mtime only, as the go command's
// file hash cache uses everywhere.
func stateOf(fi fs.FileInfo) fileState {
	return fileState{Size: fi.Size(), MtimeNs: fi.ModTime().UnixNano()}
}
