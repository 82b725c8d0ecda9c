package pipeline

import (
	"io/fs"
	"syscall"
)

func stateOf(fi fs.FileInfo) fileState {
	s := fileState{Size: fi.Size(), MtimeNs: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.CtimeNs = st.Ctim.Nano()
		s.Ino = st.Ino
		s.Dev = uint64(st.Dev)
	}
	return s
}
