package stages

import (
	"fmt"
	"slices"
	"strings"

	"gemmaft/eval"
	"gemmaft/pipeline"
)

// readsKinds checks, before anything runs, that every need of a stage of
// kind self is of one of the kinds it reads (what is the stage's table).
func readsKinds(self, what string, needs []pipeline.Need, want ...string) error {
	for _, n := range needs {
		if !slices.Contains(want, n.Kind) {
			return &pipeline.ParamError{Param: "needs",
				Msg: fmt.Sprintf("%q is a %s stage, but a %s stage reads %s of a %s stage", n.Stage, n.Kind, self, what, strings.Join(want, " or ")),
				Fix: fmt.Sprintf("name a %s stage in needs", strings.Join(want, " or "))}
		}
	}
	return nil
}

func (chatKind) CheckInputs(_ any, needs []pipeline.Need) error {
	return readsKinds(chatKindName, "the records", needs, parquetKindName, jsonlKindName)
}

// CheckInputs: a tokenize stage reads the chat text of a chat_template
// stage or the plain texts of a text stage; eos: ends plain texts, and
// loss_on: last_assistant picks among a conversation's turns.
func (tokenizeKind) CheckInputs(params any, needs []pipeline.Need) error {
	if err := readsKinds(tokenizeKindName, "the chat text", needs, chatKindName, textKindName); err != nil {
		return err
	}
	p := params.(*tokenizeParams)
	for _, n := range needs {
		switch {
		case p.EOS && n.Kind != textKindName:
			return &pipeline.ParamError{Param: "eos", Msg: fmt.Sprintf("ends plain texts, and %q is a %s stage (a chat turn ends with <end_of_turn>)", n.Stage, n.Kind),
				Fix: "remove eos: true, or read a text stage"}
		case p.LossOn == eval.LossOnLastAssistant && n.Kind == textKindName:
			return &pipeline.ParamError{Param: "loss_on", Msg: fmt.Sprintf("last_assistant picks a conversation's last turn, and %q is a text stage, trained on every token", n.Stage),
				Fix: "remove loss_on, or read a chat_template stage"}
		}
	}
	return nil
}

func (packKind) CheckInputs(_ any, needs []pipeline.Need) error {
	return readsKinds(packKindName, "the tokens", needs, tokenizeKindName, mixKindName)
}

// CheckInputs: a qlora stage trains on the packed rows of one pack stage,
// over the checkpoint of one model stage unless `model:` names a folder.
func (qloraKind) CheckInputs(params any, needs []pipeline.Need) error {
	p := params.(*qloraParams)
	var packs, models []string
	for _, n := range needs {
		switch n.Kind {
		case packKindName:
			packs = append(packs, n.Stage)
			for _, m := range n.Needs {
				if mp, ok := m.Params.(*mixParams); ok && mp.HeldOut > 0 && p.EvalFraction > 0 {
					return &pipeline.ParamError{Param: "eval_fraction",
						Msg: fmt.Sprintf("holds training rows out, and mix stage %q holds examples out already (heldout %v) for the eval loss", m.Stage, mp.HeldOut),
						Fix: "remove eval_fraction: the eval loss is computed on the mix stage's held-out examples"}
				}
			}
		case modelKindName:
			models = append(models, n.Stage)
		default:
			return &pipeline.ParamError{Param: "needs",
				Msg: fmt.Sprintf("%q is a %s stage, but a qlora stage reads the packed rows of a pack stage and the checkpoint of a model stage", n.Stage, n.Kind),
				Fix: "name a pack stage (and a model stage, unless `model:` names a checkpoint folder) in needs"}
		}
	}
	switch {
	case len(packs) == 0:
		return &pipeline.ParamError{Param: "needs", Msg: "no pack stage: a qlora stage trains on packed rows",
			Fix: "add the pack stage to needs, e.g. needs: [pack]"}
	case len(packs) > 1:
		return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("two pack stages (%s): a qlora stage trains on one", strings.Join(packs, ", ")),
			Fix: "keep one pack stage in needs"}
	case len(models) > 1:
		return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("two model stages (%s): a qlora stage trains one base model", strings.Join(models, ", ")),
			Fix: "keep one model stage in needs"}
	case len(models) == 1 && p.Model != "":
		return twoBases(p.Model, models[0])
	case len(models) == 0 && p.Model == "":
		return &pipeline.ParamError{Param: "needs", Msg: "no base model",
			Fix: "set `model:` to a checkpoint folder, or add a model stage to needs"}
	}
	return nil
}

// CheckInputs: a merge stage merges the adapter of one qlora stage into its
// base, which one model stage or `model:` names.
func (mergeKind) CheckInputs(params any, needs []pipeline.Need) error {
	return adapterNeeds(mergeKindName, params.(*mergeParams).Model, needs)
}

// CheckInputs: a gguf_lora stage reads what a merge stage reads.
func (ggufLoRAKind) CheckInputs(params any, needs []pipeline.Need) error {
	return adapterNeeds(ggufLoRAKindName, params.(*ggufLoRAParams).Model, needs)
}

// adapterNeeds checks the needs of a stage of kind self that reads one
// qlora stage's adapter and its base: the base from model (`model:`) or
// one model stage.
func adapterNeeds(self, model string, needs []pipeline.Need) error {
	needsErr := func(msg, fix string) error { return &pipeline.ParamError{Param: "needs", Msg: msg, Fix: fix} }
	var adapters, models []string
	for _, n := range needs {
		switch n.Kind {
		case "qlora":
			adapters = append(adapters, n.Stage)
		case modelKindName:
			models = append(models, n.Stage)
		default:
			return needsErr(fmt.Sprintf("%q is a %s stage, but a %s stage reads the adapter of a qlora stage and the checkpoint of a model stage", n.Stage, n.Kind, self),
				"name the qlora stage (and its model stage, unless `model:` names the checkpoint folder) in needs")
		}
	}
	switch {
	case len(adapters) == 0:
		return needsErr("no adapter", "add the qlora stage to needs")
	case len(adapters) > 1:
		return needsErr(fmt.Sprintf("two qlora stages (%s): a %s stage reads one adapter", strings.Join(adapters, ", "), self), "keep one in needs")
	case len(models) == 1 && model != "":
		return twoBases(model, models[0])
	case len(models) == 0 && model == "":
		return needsErr("no base model", "set `model:` to the checkpoint folder the adapter was trained on, or add its model stage to needs")
	}
	return nil
}

// CheckInputs: a gguf stage converts the checkpoint of a merge or model
// stage, or the folder `model:` names: one of them.
func (ggufKind) CheckInputs(params any, needs []pipeline.Need) error {
	p := params.(*ggufParams)
	if err := readsKinds(ggufKindName, "the checkpoint", needs, mergeKindName, modelKindName); err != nil {
		return err
	}
	switch {
	case len(needs) > 0 && p.Model != "":
		return &pipeline.ParamError{Param: "model", Msg: fmt.Sprintf("names %s, and stage %q is in needs: two models to convert", p.Model, needs[0].Stage),
			Fix: "remove `model:`, or the stage from needs"}
	case len(needs) == 0 && p.Model == "":
		return &pipeline.ParamError{Param: "needs", Msg: "nothing to convert",
			Fix: "add a merge stage to needs, or set `model:` to a checkpoint folder"}
	}
	for _, n := range needs {
		if n.Kind == modelKindName { // it would fail only once run
			return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("model stage %q writes a random checkpoint without a tokenizer, which a GGUF file holds", n.Stage),
				Fix: "convert a merge stage's model (it ships the tokenizer training used), or set `model:` to a checkpoint folder with tokenizer.json"}
		}
	}
	return nil
}

// twoBases is the error of a stage whose `model:` names a base while a
// model stage among its needs names another.
func twoBases(model, stage string) error {
	return &pipeline.ParamError{Param: "model", Msg: fmt.Sprintf("names %s, and model stage %q is in needs: two base models", model, stage),
		Fix: "remove `model:`, or the model stage from needs"}
}

// otherBaseGiven checks other_base: it names no base itself, so `model:`
// or a model stage among needs must, for a qlora stage's adapter.
func otherBaseGiven(needs []pipeline.Need, model string, other bool) error {
	if !other {
		return nil
	}
	adapter, base := false, model != ""
	for _, n := range needs {
		adapter = adapter || n.Kind == "qlora"
		base = base || n.Kind == modelKindName
	}
	switch {
	case !adapter:
		return &pipeline.ParamError{Param: "other_base", Msg: "applies a qlora stage's adapter to another base, and no qlora stage is in needs",
			Fix: "remove other_base"}
	case !base:
		return &pipeline.ParamError{Param: "other_base", Msg: "names no base itself",
			Fix: "set `model:` to the checkpoint to apply the adapter to, or add its model stage to needs"}
	}
	return nil
}

// missingTrainedBase reports an adapter (a qlora stage among needs)
// trained on a model stage that needs leaves out, with no `model:` naming
// the base either: the stage would find no base only once the training
// had run. (An adapter trained on a folder or an hf:// model names its
// base itself.)
func missingTrainedBase(needs []pipeline.Need, model string) error {
	if model != "" {
		return nil
	}
	for _, n := range needs {
		if n.Kind == modelKindName {
			return nil
		}
	}
	for _, n := range needs {
		if n.Kind != "qlora" {
			continue
		}
		for _, in := range n.Needs {
			if in.Kind == modelKindName {
				return &pipeline.ParamError{Param: "needs", Msg: fmt.Sprintf("no base model: the adapter of stage %s was trained on model stage %s", n.Stage, in.Stage),
					Fix: fmt.Sprintf("add %s to needs", in.Stage)}
			}
		}
	}
	return nil
}
