package hub

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// What went wrong, for errors.Is; every error the client returns about the
// Hub is an *Error that wraps one of these.
var (
	ErrGated            = errors.New("gated repository")
	ErrRepoNotFound     = errors.New("repository not found")
	ErrRevisionNotFound = errors.New("revision not found")
	ErrEntryNotFound    = errors.New("file not found")
	ErrBadToken         = errors.New("token rejected")
	ErrUnreachable      = errors.New("hub unreachable")
	ErrNotCached        = errors.New("not in the cache")
	ErrCorrupt          = errors.New("download corrupted")
	ErrRefused          = errors.New("storage refused the download")
)

// An Error says what failed and what to do about it.
type Error struct {
	Kind error  // one of the Err values above
	Msg  string // what happened and what to do
	Err  error  // the cause, if any
}

func (e *Error) Error() string { return e.Msg }

func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Err}
}

// statusError turns an error response of the Hub into an *Error, reading
// the X-Error-Code and X-Error-Message headers huggingface_hub reads.
func (c *Client) statusError(resp *http.Response, repo Repo, rev, file string) error {
	code := resp.Header.Get("X-Error-Code")
	msg := resp.Header.Get("X-Error-Message")
	what := repo.String()
	page := repo.Page(c.Endpoint)
	switch {
	case code == "GatedRepo":
		fix := fmt.Sprintf("accept its license at %s while logged in, then set HF_TOKEN to a token of that account (or run `huggingface-cli login`)", page)
		if c.Token != "" {
			fix = fmt.Sprintf("the token sent (%s) belongs to an account not granted access yet: accept the license at %s with that account, or set HF_TOKEN to one that was", c.tokenSource, page)
		}
		return &Error{Kind: ErrGated, Msg: fmt.Sprintf("%s is gated: %s", what, fix)}
	case code == "RevisionNotFound":
		return &Error{Kind: ErrRevisionNotFound, Msg: fmt.Sprintf("%s has no revision %q: give a branch, a tag or a full commit id of it (see %s/tree/main)", what, rev, page)}
	case code == "EntryNotFound":
		return &Error{Kind: ErrEntryNotFound, Msg: fmt.Sprintf("%s has no file %q at %s", what, file, rev)}
	case resp.StatusCode == http.StatusUnauthorized && strings.Contains(msg, "Invalid credentials"):
		return &Error{Kind: ErrBadToken, Msg: fmt.Sprintf("%s rejected the token (%s): it is invalid or expired; make a new one at %s/settings/tokens and set HF_TOKEN",
			c.Endpoint, c.tokenSource, strings.TrimRight(c.Endpoint, "/"))}
	case code == "RepoNotFound" || resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusNotFound:
		m := fmt.Sprintf("no %s repository %s on %s", repo.Type, repo.ID, c.Endpoint)
		if c.Token == "" {
			m += ", or it is private and no token was sent (set HF_TOKEN)"
		} else {
			m += fmt.Sprintf(", or the token sent (%s) cannot see it", c.tokenSource)
		}
		m += "; check the name"
		if repo.Type == Model {
			m += " (a dataset is written hf://datasets/ORG/NAME)"
		}
		return &Error{Kind: ErrRepoNotFound, Msg: m}
	case resp.StatusCode == http.StatusForbidden:
		return &Error{Kind: ErrGated, Msg: fmt.Sprintf("%s refused access to %s (%s): check that HF_TOKEN may read it", c.Endpoint, what, strings.TrimSpace(resp.Status+" "+msg))}
	}
	m := fmt.Sprintf("%s %s: %s", resp.Request.Method, resp.Request.URL.Redacted(), resp.Status)
	if msg != "" {
		m += ": " + msg
	}
	return &Error{Kind: ErrUnreachable, Msg: m + "; try again later"}
}

// unreachable wraps a transport error.
func (c *Client) unreachable(err error) error {
	return &Error{Kind: ErrUnreachable, Err: err,
		Msg: fmt.Sprintf("cannot reach %s (%v): check the network and HF_ENDPOINT; a run whose files are all in the cache (%s) works offline with HF_HUB_OFFLINE=1", c.Endpoint, err, c.CacheDir)}
}

// fallsBack says whether the cache may stand in for the Hub after err: the
// Hub could not be asked (network, outage) or would not answer for lack of
// a token. A wrong name or revision never falls back.
func fallsBack(err error) bool {
	return errors.Is(err, ErrUnreachable) || errors.Is(err, ErrGated) || errors.Is(err, ErrBadToken)
}
