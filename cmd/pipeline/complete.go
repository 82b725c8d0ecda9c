package main

import (
	"github.com/spf13/cobra"

	"gemmaft/pipeline"
	"gemmaft/stages"
)

// Shell completion (pipeline completion bash|zsh|fish): stage names from
// the spec already on the command line, and the values of flags that take
// a fixed set.

// specStages completes a stage name of the spec named by the command's
// first argument.
func specStages(_ *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) == 0 {
		return nil, cobra.ShellCompDirectiveDefault
	}
	dag, err := pipeline.Load(args[0], stages.Registry())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	for _, n := range dag.Nodes {
		names = append(names, n.Name+"\t"+n.KindName)
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

// forceStages completes --force: a stage, or all.
func forceStages(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	names, dir := specStages(cmd, args, toComplete)
	if len(names) > 0 {
		names = append(names, "all\tevery stage")
	}
	return names, dir
}

// stageArg completes a command's arguments: the spec file, then a stage.
func stageArg(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) == 0 {
		return []string{"yaml", "yml"}, cobra.ShellCompDirectiveFilterFileExt
	}
	if len(args) == 1 {
		return specStages(cmd, args, toComplete)
	}
	return nil, cobra.ShellCompDirectiveNoFileComp
}

// completeStageFlags completes --until, --only and --force, which name
// stages.
func completeStageFlags(cmd *cobra.Command) {
	_ = cmd.RegisterFlagCompletionFunc("until", specStages)
	_ = cmd.RegisterFlagCompletionFunc("only", specStages)
	_ = cmd.RegisterFlagCompletionFunc("force", forceStages)
}

// completeValues completes a flag from a fixed set of values.
func completeValues(cmd *cobra.Command, flag string, values ...string) {
	_ = cmd.RegisterFlagCompletionFunc(flag, cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp))
}

// specArg completes a command's one argument, a spec file.
func specArg(_ *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) == 0 {
		return []string{"yaml", "yml"}, cobra.ShellCompDirectiveFilterFileExt
	}
	return nil, cobra.ShellCompDirectiveNoFileComp
}
