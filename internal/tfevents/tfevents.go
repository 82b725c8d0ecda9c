// Package tfevents writes TensorBoard event files: a TFRecord stream of
// Event protocol buffers (tensorflow/core/util/event.proto) holding scalar
// and text summaries, as TensorFlow's EventsWriter, torch.utils.tensorboard
// and tensorboardX write them. `tensorboard --logdir` reads the files, and
// `wandb sync --sync-tensorboard` uploads them.
//
// The encoding is written by hand: the few messages and fields used here
// are fixed by the definitions, and a file is nothing but framed records.
//
// TFRecord framing, per record:
//
//	uint64 length          little endian
//	uint32 masked CRC32C of the 8 length bytes
//	byte   data[length]    one serialized Event
//	uint32 masked CRC32C of data
//
// where masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.
package tfevents

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"
)

// FileVersion is what the first event of every file says.
const FileVersion = "brain.Event:2"

// A Writer appends events to one new event file in a folder.
type Writer struct {
	path string
	f    *os.File
	w    *bufio.Writer
	err  error
}

// fileSeq tells apart two files one process creates in the same second.
var fileSeq atomic.Int64

// Create makes dir (if needed) and starts a new event file in it, named as
// TensorFlow names them (events.out.tfevents.<seconds>.<host>.<pid>.<n>, so
// that TensorBoard finds it and reads a folder's files in the order they
// were started), holding the file-version event stamped with now.
func Create(dir string, now time.Time) (*Writer, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	host = strings.Map(func(r rune) rune {
		if r == '.' || r == '-' || r == '_' || ('0' <= r && r <= '9') || ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z') {
			return r
		}
		return '_'
	}, host)
	if host == "" {
		host = "localhost"
	}
	name := fmt.Sprintf("events.out.tfevents.%010d.%s.%d.%d", now.Unix(), host, os.Getpid(), fileSeq.Add(1)-1)
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	w := &Writer{path: path, f: f, w: bufio.NewWriter(f)}
	var ev []byte
	ev = appendDouble(ev, 1, wallTime(now))
	ev = appendBytes(ev, 3, []byte(FileVersion))
	w.record(ev)
	return w, w.err
}

// Path is the event file's path.
func (w *Writer) Path() string { return w.path }

// A Value is one summary value: a scalar or a text.
type Value struct {
	tag    string
	scalar float32
	text   *string
}

// Scalar is a scalar summary (a point on the curve named tag). TensorBoard
// stores scalars as float32.
func Scalar(tag string, v float64) Value { return Value{tag: tag, scalar: float32(v)} }

// Text is a text summary, which TensorBoard's text plugin shows as
// Markdown (tables included).
func Text(tag, markdown string) Value { return Value{tag: tag, text: &markdown} }

// Add writes one event holding values at step, stamped with wall.
func (w *Writer) Add(step int64, wall time.Time, values ...Value) error {
	if len(values) == 0 || w.err != nil {
		return w.err
	}
	var summary []byte
	for _, v := range values {
		summary = appendBytes(summary, 1, v.encode()) // Summary.value
	}
	var ev []byte
	ev = appendDouble(ev, 1, wallTime(wall)) // Event.wall_time
	if step != 0 {
		ev = appendVarintField(ev, 2, uint64(step)) // Event.step
	}
	ev = appendBytes(ev, 5, summary) // Event.summary
	w.record(ev)
	return w.err
}

// Flush hands what was added to the operating system, so that a reader
// (TensorBoard following a run) sees it.
func (w *Writer) Flush() error {
	if w.err == nil && w.f != nil {
		w.err = w.w.Flush()
	}
	return w.err
}

// Close flushes the file to disk and closes it.
func (w *Writer) Close() error {
	if w.f == nil {
		return w.err
	}
	if w.err == nil {
		w.err = w.w.Flush()
	}
	if w.err == nil {
		w.err = w.f.Sync()
	}
	if err := w.f.Close(); w.err == nil {
		w.err = err
	}
	w.f = nil
	return w.err
}

// encode serializes the Summary.Value.
func (v Value) encode() []byte {
	var b []byte
	b = appendBytes(b, 1, []byte(v.tag)) // tag
	if v.text == nil {
		b = appendTag(b, 2, wireFixed32) // simple_value
		return binary.LittleEndian.AppendUint32(b, math.Float32bits(v.scalar))
	}
	// SummaryMetadata{plugin_data: {plugin_name: "text"}, data_class: TENSOR}
	// as TensorBoard's own text summaries carry it; the plugin's content
	// (TextPluginData, version 0) encodes to nothing.
	var plugin, meta, shape, tensor []byte
	plugin = appendBytes(plugin, 1, []byte("text"))
	meta = appendBytes(meta, 1, plugin)
	meta = appendVarintField(meta, 4, dataClassTensor)
	// TensorProto{dtype: DT_STRING, tensor_shape: {} (a scalar), string_val: [text]}
	tensor = appendVarintField(tensor, 1, dtString)
	tensor = appendBytes(tensor, 2, shape)
	tensor = appendBytes(tensor, 8, []byte(*v.text))
	b = appendBytes(b, 9, meta)   // metadata
	b = appendBytes(b, 8, tensor) // tensor
	return b
}

const (
	dtString        = 7 // tensorflow.DataType DT_STRING
	dataClassTensor = 2 // tensorboard.DataClass DATA_CLASS_TENSOR
)

// record frames data as one TFRecord.
func (w *Writer) record(data []byte) {
	if w.err != nil {
		return
	}
	var head [12]byte
	binary.LittleEndian.PutUint64(head[:8], uint64(len(data)))
	binary.LittleEndian.PutUint32(head[8:], MaskedCRC(head[:8]))
	var tail [4]byte
	binary.LittleEndian.PutUint32(tail[:], MaskedCRC(data))
	for _, p := range [][]byte{head[:], data, tail[:]} {
		if _, err := w.w.Write(p); err != nil {
			w.err = err
			return
		}
	}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MaskedCRC is the CRC32C of data, masked as TFRecord stores it (a CRC of
// data that itself holds CRCs is then not a fixed point).
func MaskedCRC(data []byte) uint32 {
	c := crc32.Checksum(data, castagnoli)
	return ((c >> 15) | (c << 17)) + 0xa282ead8
}

// wallTime is t in seconds since 1970, as TensorFlow's time.time() gives.
func wallTime(t time.Time) float64 { return float64(t.Unix()) + float64(t.Nanosecond())/1e9 }

// Protocol buffer wire types.
const (
	wireVarint  = 0
	wireFixed64 = 1
	wireBytes   = 2
	wireFixed32 = 5
)

func appendTag(b []byte, field, wire int) []byte {
	return binary.AppendUvarint(b, uint64(field)<<3|uint64(wire))
}

func appendVarintField(b []byte, field int, v uint64) []byte {
	return binary.AppendUvarint(appendTag(b, field, wireVarint), v)
}

func appendDouble(b []byte, field int, v float64) []byte {
	return binary.LittleEndian.AppendUint64(appendTag(b, field, wireFixed64), math.Float64bits(v))
}

func appendBytes(b []byte, field int, v []byte) []byte {
	b = binary.AppendUvarint(appendTag(b, field, wireBytes), uint64(len(v)))
	return append(b, v...)
}

// MarkdownTable renders rows of (name, value) as a two-column Markdown
// table under the given headings, the shape TensorBoard's text plugin
// shows as a table.
func MarkdownTable(nameHeading, valueHeading string, rows [][2]string) string {
	cell := func(s string) string {
		s = strings.ReplaceAll(s, "|", `\|`)
		return strings.ReplaceAll(s, "\n", " ")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "| %s | %s |\n|---|---|\n", cell(nameHeading), cell(valueHeading))
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s |\n", cell(r[0]), cell(r[1]))
	}
	return b.String()
}
