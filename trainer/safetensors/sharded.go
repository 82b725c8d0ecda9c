package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"gemmaft/internal/atomicfile"
)

// StreamTensor is a tensor whose bytes are produced when the writer reaches
// it, so a checkpoint far larger than memory can be written one tensor at
// a time.
type StreamTensor struct {
	Name  string
	DType DType
	Shape []int
	// Write writes exactly the tensor's bytes (the product of the shape
	// times the dtype's size).
	Write func(w io.Writer) error
}

func (t StreamTensor) bytes() int64 {
	n := int64(t.DType.Size())
	for _, d := range t.Shape {
		n *= int64(d)
	}
	return n
}

// IndexFile is the weight index of a sharded checkpoint.
const IndexFile = "model.safetensors.index.json"

// WriteSharded writes tensors into dir the way Hugging Face's
// save_pretrained lays them out: in name order, in model.safetensors, or,
// when they exceed maxShard bytes, in model-0000i-of-0000n.safetensors
// with model.safetensors.index.json. Each shard is written atomically;
// metadata goes into every shard's header.
func WriteSharded(dir string, tensors []StreamTensor, maxShard int64, metadata map[string]string) error {
	ts := append([]StreamTensor(nil), tensors...)
	sort.Slice(ts, func(i, j int) bool { return ts[i].Name < ts[j].Name })
	var shards [][]StreamTensor
	var cur []StreamTensor
	var curBytes, total int64
	for i, t := range ts {
		if i > 0 && ts[i-1].Name == t.Name {
			return fmt.Errorf("safetensors: duplicate tensor %q", t.Name)
		}
		if t.DType.Size() == 0 {
			return fmt.Errorf("safetensors: tensor %q has unknown dtype %q", t.Name, t.DType)
		}
		n := t.bytes()
		if len(cur) > 0 && curBytes+n > maxShard {
			shards = append(shards, cur)
			cur, curBytes = nil, 0
		}
		cur = append(cur, t)
		curBytes += n
		total += n
	}
	shards = append(shards, cur)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	weightMap := map[string]string{}
	for i, shard := range shards {
		name := "model.safetensors"
		if len(shards) > 1 {
			name = fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards))
		}
		if err := writeShard(filepath.Join(dir, name), shard, metadata); err != nil {
			return err
		}
		for _, t := range shard {
			weightMap[t.Name] = name
		}
	}
	if len(shards) == 1 {
		return nil
	}
	idx, _ := json.MarshalIndent(map[string]any{
		"metadata":   map[string]any{"total_size": total},
		"weight_map": weightMap,
	}, "", "  ")
	return atomicfile.WriteFile(filepath.Join(dir, IndexFile), idx)
}

// writeShard streams one shard: the header, then each tensor's bytes,
// each checked to be exactly as long as its shape says.
func writeShard(path string, ts []StreamTensor, metadata map[string]string) error {
	hdr := map[string]any{}
	if len(metadata) > 0 {
		hdr["__metadata__"] = metadata
	}
	var off int64
	for _, t := range ts {
		shape := t.Shape
		if shape == nil {
			shape = []int{}
		}
		n := t.bytes()
		hdr[t.Name] = map[string]any{"dtype": t.DType, "shape": shape, "data_offsets": []int64{off, off + n}}
		off += n
	}
	js, err := json.Marshal(hdr)
	if err != nil {
		return err
	}
	for len(js)%8 != 0 {
		js = append(js, ' ')
	}
	return atomicfile.Write(path, func(w io.Writer) error {
		var lenBuf [8]byte
		binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(js)))
		if _, err := w.Write(lenBuf[:]); err != nil {
			return err
		}
		if _, err := w.Write(js); err != nil {
			return err
		}
		for _, t := range ts {
			cw := &countingWriter{w: w}
			if err := t.Write(cw); err != nil {
				return fmt.Errorf("tensor %s: %w", t.Name, err)
			}
			if cw.n != t.bytes() {
				return fmt.Errorf("tensor %s: wrote %d bytes, its shape %v of %s needs %d", t.Name, cw.n, t.Shape, t.DType, t.bytes())
			}
		}
		return nil
	})
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
