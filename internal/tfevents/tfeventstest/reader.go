// Package tfeventstest reads TensorBoard event files for tests, written
// from the file format's definitions and sharing no code with the writer
// (package tfevents): the TFRecord framing with both masked CRC32C checked,
// and each record decoded by the Protocol Buffers runtime against a schema
// written out here from TensorFlow's event.proto, summary.proto,
// tensor.proto, tensor_shape.proto and types.proto. A field the schema does
// not know, a bad CRC, a torn record or trailing bytes are errors.
package tfeventstest

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/bufbuild/protocompile"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

// schema is the part of TensorBoard's protocol buffers that scalar and text
// summaries use, with the field numbers and types of the definitions. Fields
// left out would be reported as unknown.
const schema = `
syntax = "proto3";
package tensorboard;

// tensorflow/core/util/event.proto
message Event {
  double wall_time = 1;
  int64 step = 2;
  oneof what {
    string file_version = 3;
    bytes graph_def = 4;
    Summary summary = 5;
    SessionLog session_log = 7;
    bytes meta_graph_def = 9;
  }
}

message SessionLog {
  enum SessionStatus {
    STATUS_UNSPECIFIED = 0;
    START = 1;
    STOP = 2;
    CHECKPOINT = 3;
  }
  SessionStatus status = 1;
  string checkpoint_path = 2;
  string msg = 3;
}

// tensorflow/core/framework/summary.proto
message SummaryMetadata {
  message PluginData {
    string plugin_name = 1;
    bytes content = 2;
  }
  PluginData plugin_data = 1;
  string display_name = 2;
  string summary_description = 3;
  DataClass data_class = 4;
}

enum DataClass {
  DATA_CLASS_UNKNOWN = 0;
  DATA_CLASS_SCALAR = 1;
  DATA_CLASS_TENSOR = 2;
  DATA_CLASS_BLOB_SEQUENCE = 3;
}

message Summary {
  message Value {
    string node_name = 7;
    string tag = 1;
    SummaryMetadata metadata = 9;
    oneof value {
      float simple_value = 2;
      bytes obsolete_old_style_histogram = 3;
      TensorProto tensor = 8;
    }
  }
  repeated Value value = 1;
}

// tensorflow/core/framework/tensor_shape.proto
message TensorShapeProto {
  message Dim {
    int64 size = 1;
    string name = 2;
  }
  repeated Dim dim = 2;
  bool unknown_rank = 3;
}

// tensorflow/core/framework/types.proto (the first types)
enum DataType {
  DT_INVALID = 0;
  DT_FLOAT = 1;
  DT_DOUBLE = 2;
  DT_INT32 = 3;
  DT_UINT8 = 4;
  DT_INT16 = 5;
  DT_INT8 = 6;
  DT_STRING = 7;
}

// tensorflow/core/framework/tensor.proto
message TensorProto {
  DataType dtype = 1;
  TensorShapeProto tensor_shape = 2;
  int32 version_number = 3;
  bytes tensor_content = 4;
  repeated float float_val = 5 [packed = true];
  repeated double double_val = 6 [packed = true];
  repeated int32 int_val = 7 [packed = true];
  repeated bytes string_val = 8;
}
`

var (
	eventOnce sync.Once
	eventDesc protoreflect.MessageDescriptor
	eventErr  error
)

func eventDescriptor() (protoreflect.MessageDescriptor, error) {
	eventOnce.Do(func() {
		c := protocompile.Compiler{Resolver: &protocompile.SourceResolver{
			Accessor: protocompile.SourceAccessorFromMap(map[string]string{"tensorboard.proto": schema}),
		}}
		files, err := c.Compile(context.Background(), "tensorboard.proto")
		if err != nil {
			eventErr = fmt.Errorf("compiling the event schema: %w", err)
			return
		}
		eventDesc = files[0].Messages().ByName("Event")
	})
	return eventDesc, eventErr
}

// An Event is one record of an event file.
type Event struct {
	WallTime    float64
	Step        int64
	FileVersion string
	Values      []Value // the summary's values
}

// A Value is one summary value.
type Value struct {
	Tag string
	// Simple is the scalar of a simple_value summary.
	Simple *float32
	// Plugin and DataClass come from the value's metadata.
	Plugin    string
	DataClass string
	// DType, Shape and Strings come from a tensor value.
	DType     string
	Shape     []int64
	Strings   []string
	HasTensor bool
}

// maskedCRC32C is TFRecord's checksum: CRC-32C (Castagnoli), rotated right
// by 15 bits and offset by 0xa282ead8.
func maskedCRC32C(b []byte) uint32 {
	c := crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli))
	return (c>>15 | c<<17) + 0xa282ead8
}

// ReadFile reads every record of one event file.
func ReadFile(path string) ([]Event, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	desc, err := eventDescriptor()
	if err != nil {
		return nil, err
	}
	var out []Event
	for off := 0; off < len(data); {
		if len(data)-off < 12 {
			return nil, fmt.Errorf("%s: %d stray bytes at offset %d", path, len(data)-off, off)
		}
		n := binary.LittleEndian.Uint64(data[off:])
		if got, want := binary.LittleEndian.Uint32(data[off+8:]), maskedCRC32C(data[off:off+8]); got != want {
			return nil, fmt.Errorf("%s: record at %d: length CRC %#x, want %#x", path, off, got, want)
		}
		if n > uint64(len(data)-off-16) {
			return nil, fmt.Errorf("%s: record at %d: length %d runs past the end", path, off, n)
		}
		payload := data[off+12 : off+12+int(n)]
		if got, want := binary.LittleEndian.Uint32(data[off+12+int(n):]), maskedCRC32C(payload); got != want {
			return nil, fmt.Errorf("%s: record at %d: data CRC %#x, want %#x", path, off, got, want)
		}
		msg := dynamicpb.NewMessage(desc)
		if err := proto.Unmarshal(payload, msg); err != nil {
			return nil, fmt.Errorf("%s: record at %d: %w", path, off, err)
		}
		if err := noUnknown(msg); err != nil {
			return nil, fmt.Errorf("%s: record at %d: %w", path, off, err)
		}
		ev, err := toEvent(msg)
		if err != nil {
			return nil, fmt.Errorf("%s: record at %d: %w", path, off, err)
		}
		out = append(out, ev)
		off += 16 + int(n)
	}
	return out, nil
}

// ReadDir reads the event files of dir (those whose name holds "tfevents",
// as TensorBoard picks them) in name order, and returns their paths too.
func ReadDir(dir string) ([]Event, []string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, err
	}
	var files []string
	for _, e := range entries {
		if !e.IsDir() && strings.Contains(e.Name(), "tfevents") {
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(files)
	if len(files) == 0 {
		return nil, nil, fmt.Errorf("%s holds no event file", dir)
	}
	var all []Event
	for _, f := range files {
		evs, err := ReadFile(f)
		if err != nil {
			return nil, nil, err
		}
		all = append(all, evs...)
	}
	return all, files, nil
}

// noUnknown fails on any field, at any depth, that the schema lacks.
func noUnknown(m protoreflect.Message) error {
	if u := m.GetUnknown(); len(u) > 0 {
		return fmt.Errorf("%s has %d bytes of fields the definitions do not have", m.Descriptor().FullName(), len(u))
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind {
			return true
		}
		if fd.IsList() {
			for i := 0; i < v.List().Len() && err == nil; i++ {
				err = noUnknown(v.List().Get(i).Message())
			}
		} else {
			err = noUnknown(v.Message())
		}
		return err == nil
	})
	return err
}

// toEvent goes through the canonical JSON mapping, so the fields are read
// by their names in the definitions.
func toEvent(msg proto.Message) (Event, error) {
	js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(msg)
	if err != nil {
		return Event{}, err
	}
	var raw struct {
		WallTime    float64 `json:"wall_time"`
		Step        string  `json:"step"` // int64 is a JSON string
		FileVersion string  `json:"file_version"`
		Summary     *struct {
			Value []struct {
				Tag         string   `json:"tag"`
				SimpleValue *float64 `json:"simple_value"`
				Metadata    *struct {
					PluginData *struct {
						PluginName string `json:"plugin_name"`
					} `json:"plugin_data"`
					DataClass string `json:"data_class"`
				} `json:"metadata"`
				Tensor *struct {
					DType string `json:"dtype"`
					Shape *struct {
						Dim []struct {
							Size string `json:"size"`
						} `json:"dim"`
					} `json:"tensor_shape"`
					StringVal []string `json:"string_val"` // base64
				} `json:"tensor"`
			} `json:"value"`
		} `json:"summary"`
	}
	if err := json.Unmarshal(js, &raw); err != nil {
		return Event{}, err
	}
	ev := Event{WallTime: raw.WallTime, FileVersion: raw.FileVersion}
	if raw.Step != "" {
		if ev.Step, err = strconv.ParseInt(raw.Step, 10, 64); err != nil {
			return Event{}, err
		}
	}
	if raw.Summary == nil {
		if raw.FileVersion == "" {
			return Event{}, errors.New("an event with neither file_version nor summary")
		}
		return ev, nil
	}
	for _, rv := range raw.Summary.Value {
		v := Value{Tag: rv.Tag}
		if rv.SimpleValue != nil {
			f := float32(*rv.SimpleValue)
			v.Simple = &f
		}
		if md := rv.Metadata; md != nil {
			v.DataClass = md.DataClass
			if md.PluginData != nil {
				v.Plugin = md.PluginData.PluginName
			}
		}
		if t := rv.Tensor; t != nil {
			v.HasTensor = true
			v.DType = t.DType
			if t.Shape != nil {
				for _, d := range t.Shape.Dim {
					n, _ := strconv.ParseInt(d.Size, 10, 64)
					v.Shape = append(v.Shape, n)
				}
			}
			for _, s := range t.StringVal {
				b, err := base64.StdEncoding.DecodeString(s)
				if err != nil {
					return Event{}, err
				}
				v.Strings = append(v.Strings, string(b))
			}
		}
		ev.Values = append(ev.Values, v)
	}
	return ev, nil
}

// Scalars collects the simple_value scalars of events by tag, as
// TensorBoard's EventAccumulator lists them: (step, value) in file order.
func Scalars(events []Event) map[string][]Point {
	out := map[string][]Point{}
	for _, ev := range events {
		for _, v := range ev.Values {
			if v.Simple != nil {
				out[v.Tag] = append(out[v.Tag], Point{Step: ev.Step, Value: *v.Simple, WallTime: ev.WallTime})
			}
		}
	}
	return out
}

// A Point is one scalar.
type Point struct {
	Step     int64
	Value    float32
	WallTime float64
}

// Texts collects the text summaries (plugin "text", one DT_STRING) by tag.
func Texts(events []Event) map[string][]string {
	out := map[string][]string{}
	for _, ev := range events {
		for _, v := range ev.Values {
			if v.Plugin == "text" && v.DType == "DT_STRING" && len(v.Strings) == 1 {
				out[v.Tag] = append(out[v.Tag], v.Strings[0])
			}
		}
	}
	return out
}
