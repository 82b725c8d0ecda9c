package stages

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/goccy/go-yaml"

	"gemmaft/internal/atomicfile"
	"gemmaft/pipeline"
)

// cardParams are the model card's fields a DAG cannot know: the Hub ids
// of the base model (e.g. google/gemma-3-12b-it) and of the datasets, and
// the languages.
type cardParams struct {
	BaseModel string
	Datasets  []string
	Language  []string
}

// provenance is what the cached entries upstream of an exported model say
// about its making.
type provenance struct {
	qlora, pack, tokenize, chat, merge, model, mix *pipeline.Manifest
	sources                                        []*pipeline.Manifest
}

func provenanceOf(lineage []*pipeline.Manifest) provenance {
	var p provenance
	first := func(dst **pipeline.Manifest, m *pipeline.Manifest) {
		if *dst == nil {
			*dst = m
		}
	}
	for _, m := range lineage {
		switch m.Kind {
		case "qlora":
			first(&p.qlora, m)
		case packKindName:
			first(&p.pack, m)
		case tokenizeKindName:
			first(&p.tokenize, m)
		case chatKindName:
			first(&p.chat, m)
		case mergeKindName:
			first(&p.merge, m)
		case modelKindName:
			first(&p.model, m)
		case mixKindName:
			first(&p.mix, m)
		case parquetKindName, jsonlKindName, textKindName:
			p.sources = append(p.sources, m)
		}
	}
	return p
}

// params decodes a manifest's parameters (nil manifest: none).
func params(m *pipeline.Manifest) map[string]any {
	out := map[string]any{}
	if m != nil {
		json.Unmarshal(m.Params, &out)
	}
	return out
}

// trainingSystem is the system text every training record carried, when
// the sources set one through `system:` and all the same: Alpaca records
// only (a conversation may carry its own, and a plain text none).
func (p provenance) trainingSystem() string {
	sys := ""
	for i, s := range p.sources {
		ps := params(s)
		if ps["system_column"] != nil && ps["system_column"] != "" {
			return ""
		}
		if f, _ := ps["format"].(string); f != "" || s.Kind == textKindName {
			return ""
		}
		v, _ := ps["system"].(string)
		if i > 0 && v != sys {
			return ""
		}
		sys = v
	}
	return sys
}

// cardFile is one exported file the card lists.
type cardFile struct{ Name, What string }

// modelCard is what an exporting stage knows of the model it wrote.
type modelCard struct {
	Title  string
	Format string // a sentence on the files' format and what loads them
	Files  []cardFile
	Tags   []string
	// Merge is the base the adapter was merged into (dequantized or
	// original); empty takes it from a merge stage upstream.
	Merge string
	cardParams
}

// write writes README.md (with the Hub's YAML header) and NOTICE into dir,
// for the model that lineage made.
func (c modelCard) write(dir string, lineage []*pipeline.Manifest) error {
	p := provenanceOf(lineage)
	header := yaml.MapSlice{}
	if c.BaseModel != "" {
		header = append(header, yaml.MapItem{Key: "base_model", Value: c.BaseModel})
	}
	header = append(header, yaml.MapItem{Key: "license", Value: "gemma"})
	if len(c.Datasets) > 0 {
		header = append(header, yaml.MapItem{Key: "datasets", Value: c.Datasets})
	}
	if len(c.Language) > 0 {
		header = append(header, yaml.MapItem{Key: "language", Value: c.Language})
	}
	header = append(header,
		yaml.MapItem{Key: "pipeline_tag", Value: "text-generation"},
		yaml.MapItem{Key: "tags", Value: append([]string{"gemma3", "qlora", "lora"}, c.Tags...)})
	hy, err := yaml.Marshal(header)
	if err != nil {
		return err
	}
	data := cardData{Title: c.Title, Format: c.Format, Files: c.Files, BaseModel: c.BaseModel, Merge: c.Merge, System: p.trainingSystem()}
	if data.Merge == "" && p.merge != nil {
		data.Merge = fmt.Sprint(p.merge.Stats["base"])
	}
	data.fill(p)
	var body bytes.Buffer
	if err := cardTemplate.Execute(&body, data); err != nil {
		return err
	}
	card := "---\n" + string(hy) + "---\n\n" + body.String()
	if err := atomicfile.WriteFile(filepath.Join(dir, "README.md"), []byte(card)); err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, "NOTICE"), []byte(gemmaNotice))
}

// cardData is what the card's template shows.
type cardData struct {
	Title, Format, BaseModel, BaseDesc, Merge, System string
	Files                                             []cardFile
	Training, Results, Data                           [][2]string
}

func (d *cardData) fill(p provenance) {
	q := params(p.qlora)
	switch {
	case d.BaseModel != "":
		d.BaseDesc = "[" + d.BaseModel + "](https://huggingface.co/" + d.BaseModel + ")"
	case p.model != nil:
		m := params(p.model)
		d.BaseDesc = fmt.Sprintf("a randomly initialised Gemma 3 of the %v shape (seed %v), for demonstration", m["preset"], m["seed"])
	case q["model"] != nil:
		d.BaseDesc = fmt.Sprintf("the Gemma 3 checkpoint `%s`", filepath.Base(fmt.Sprint(q["model"])))
	default:
		d.BaseDesc = "Gemma 3"
	}
	add := func(rows *[][2]string, name string, v any) {
		if v == nil || v == "" {
			return
		}
		switch x := v.(type) {
		case []any:
			var s []string
			for _, e := range x {
				s = append(s, fmt.Sprint(e))
			}
			v = strings.Join(s, ", ")
		case float64:
			v = fmt.Sprintf("%.6g", x)
		}
		*rows = append(*rows, [2]string{name, fmt.Sprint(v)})
	}
	if p.qlora != nil {
		add(&d.Training, "method", map[string]string{"nf4": "QLoRA (NF4 base, double quantisation)", "none": "LoRA on the unquantised base"}[fmt.Sprint(q["quantize"])])
		for _, k := range []string{"r", "alpha", "rslora", "dropout", "target_modules", "optimizer", "lr", "schedule", "warmup_steps", "warmup_ratio",
			"weight_decay", "max_grad_norm", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "backend"} {
			if k == "max_steps" && q[k] == 0.0 || k == "warmup_steps" && q["warmup_ratio"] != nil {
				continue
			}
			add(&d.Training, k, q[k])
		}
		st := p.qlora.Stats
		for _, k := range []string{"steps", "final_loss", "eval_loss", "train_seconds", "peak_gpu_gib"} {
			if v, ok := st[k]; ok {
				add(&d.Results, strings.ReplaceAll(k, "_", " "), number(v))
			}
		}
	}
	for _, s := range p.sources {
		paths := params(s)["paths"]
		add(&d.Data, "source "+s.Stage, fmt.Sprintf("%s files %v, %v records", s.Kind, paths, number(s.Stats["records"])))
	}
	if p.mix != nil {
		st := p.mix.Stats
		add(&d.Data, "mix", fmt.Sprintf("%v examples, %v tokens (%v trained), %v held out, weighted by %v",
			number(st["examples"]), number(st["tokens"]), number(st["trained_tokens"]), number(st["heldout_examples"]), params(p.mix)["by"]))
		if srcs, ok := st["sources"].(map[string]any); ok {
			names := make([]string, 0, len(srcs))
			for n := range srcs {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				c, _ := srcs[n].(map[string]any)
				add(&d.Data, "mix of "+n, fmt.Sprintf("%v examples (%v distinct), %v tokens, %v held out",
					number(c["examples"]), number(c["unique"]), number(c["tokens"]), number(c["heldout"])))
			}
		}
	} else if p.tokenize != nil {
		st := p.tokenize.Stats
		add(&d.Data, "tokens", fmt.Sprintf("%v (%v trained), %v records", number(st["tokens"]), number(st["trained_tokens"]), number(st["records"])))
		if f, ok := st["fertility"]; ok {
			add(&d.Data, "tokens per word", number(f))
		}
	}
	if p.pack != nil {
		st := p.pack.Stats
		add(&d.Data, "packing", fmt.Sprintf("%v rows of %v tokens, %v examples, efficiency %v",
			number(st["rows"]), params(p.pack)["seq_len"], number(st["examples"]), number(st["efficiency"])))
	}
}

// number renders a manifest statistic (json.Number or float64) briefly.
func number(v any) any {
	switch x := v.(type) {
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i
		}
		f, _ := x.Float64()
		return fmt.Sprintf("%.4g", f)
	case float64:
		return fmt.Sprintf("%.4g", x)
	}
	return v
}

var cardTemplate = template.Must(template.New("card").Parse(`# {{.Title}}

A fine-tune of {{.BaseDesc}}: a LoRA adapter trained on instruction data in Gemma 3's
chat format{{if .Merge}}, merged into the {{if eq .Merge "dequantized"}}NF4-dequantised base weights it was trained
against{{else}}original base weights{{end}}{{end}}. {{.Format}}.

## Files

| file | what it is |
|---|---|
{{range .Files}}| ` + "`{{.Name}}`" + ` | {{.What}} |
{{end}}
## Prompt format

Gemma 3's turns, as in training: ` + "`<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n`" + `,
with generation stopping at ` + "`<end_of_turn>`" + `. Gemma 3 has no system turn: a system text goes,
followed by a blank line, in front of the first user message.
{{- if .System}} Training used this system text for every record:

> {{.System}}
{{- end}}
{{if .Training}}
## Training

| setting | value |
|---|---|
{{range .Training}}| {{index . 0}} | {{index . 1}} |
{{end}}{{end}}{{if .Results}}
## Results

| | |
|---|---|
{{range .Results}}| {{index . 0}} | {{index . 1}} |
{{end}}{{end}}{{if .Data}}
## Data

| | |
|---|---|
{{range .Data}}| {{index . 0}} | {{index . 1}} |
{{end}}{{end}}
## License

This model is a derivative of Gemma. Gemma is provided under and subject to the Gemma Terms
of Use found at ai.google.dev/gemma/terms; its use is restricted as the Gemma Prohibited Use
Policy (ai.google.dev/gemma/prohibited_use_policy) says. See NOTICE.
`))

// gemmaNotice is the notice Gemma's terms ask distributors of a model
// derivative to include, with the use restrictions passed on.
const gemmaNotice = `Gemma is provided under and subject to the Gemma Terms of Use found at
ai.google.dev/gemma/terms

This model is a Model Derivative of Gemma: its weights were modified by fine-tuning
(a LoRA adapter merged into them, and for GGUF files, converted and possibly
quantised). Its use and further distribution are subject to the Gemma Terms of Use,
including the use restrictions of the Gemma Prohibited Use Policy found at
ai.google.dev/gemma/prohibited_use_policy, which anyone you distribute it to must
also be bound by. Keep this notice with any copy.
`
