package hub

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"gemmaft/internal/userdir"
)

// DefaultEndpoint is the Hub itself.
const DefaultEndpoint = "https://huggingface.co"

// A Client reads from one Hub into one cache. Its zero value is not usable:
// start from FromEnv.
type Client struct {
	Endpoint string // without a trailing slash
	Token    string // sent to Endpoint only, never to the hosts it redirects to
	CacheDir string // the hub cache: models--ORG--NAME/ and friends
	Offline  bool   // never touch the network; the cache must hold everything

	HTTP *http.Client
	// Retries is how many times a request is tried again after a network
	// error, a 429 or a 5xx; a download resumes where it stopped.
	Retries int
	// Backoff is the first wait before a retry; it doubles up to MaxBackoff.
	Backoff, MaxBackoff time.Duration
	// IdleTimeout ends a download that received nothing for this long
	// (then it is retried).
	IdleTimeout time.Duration
	// Workers is how many files download at once.
	Workers int
	// UserAgent is sent with every request.
	UserAgent string

	tokenSource string // where Token came from, for messages
}

// FromEnv returns a client configured the way huggingface_hub configures
// itself: HF_ENDPOINT; HF_HUB_CACHE, else HF_HUB_CACHE's older name
// HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
// $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub;
// HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else the file at HF_TOKEN_PATH, else
// $HF_HOME/token, which `huggingface-cli login` writes; HF_HUB_OFFLINE (or
// TRANSFORMERS_OFFLINE) set to 1, true, yes or on; HF_HUB_ETAG_TIMEOUT and
// HF_HUB_DOWNLOAD_TIMEOUT in seconds.
func FromEnv() *Client {
	home := os.Getenv("HF_HOME")
	if home == "" {
		// $XDG_CACHE_HOME as given (a relative one too, as
		// huggingface_hub takes it), else ~/.cache.
		cache := os.Getenv("XDG_CACHE_HOME")
		if cache == "" {
			h, err := userdir.Home()
			if err != nil {
				h = os.TempDir() // no home folder at all: rare, and said by no error here
			}
			cache = filepath.Join(h, ".cache")
		}
		home = filepath.Join(cache, "huggingface")
	}
	home = expandHome(home)
	c := &Client{
		Endpoint:    strings.TrimRight(envOr("HF_ENDPOINT", DefaultEndpoint), "/"),
		CacheDir:    expandHome(envOr("HF_HUB_CACHE", envOr("HUGGINGFACE_HUB_CACHE", filepath.Join(home, "hub")))),
		Offline:     isTrue(os.Getenv("HF_HUB_OFFLINE")) || isTrue(os.Getenv("TRANSFORMERS_OFFLINE")),
		Retries:     5,
		Backoff:     time.Second,
		MaxBackoff:  8 * time.Second,
		IdleTimeout: seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10),
		Workers:     4,
		UserAgent:   "gemmaft-pipeline (huggingface_hub cache layout)",
	}
	for _, v := range []string{"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} {
		if t := cleanToken(os.Getenv(v)); t != "" {
			c.Token, c.tokenSource = t, "$"+v
			break
		}
	}
	if c.Token == "" {
		path := expandHome(envOr("HF_TOKEN_PATH", filepath.Join(home, "token")))
		if data, err := os.ReadFile(path); err == nil {
			if t := cleanToken(string(data)); t != "" {
				c.Token, c.tokenSource = t, path
			}
		}
	}
	timeout := seconds("HF_HUB_ETAG_TIMEOUT", 10)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = (&net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}).DialContext
	tr.TLSHandshakeTimeout = timeout
	tr.ResponseHeaderTimeout = 3 * timeout
	c.HTTP = &http.Client{
		Transport: tr,
		// Redirects are followed by hand: relative ones (a renamed
		// repository) keep the token, others (LFS storage) must not get it.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func isTrue(v string) bool {
	switch strings.ToUpper(strings.TrimSpace(v)) {
	case "1", "ON", "YES", "TRUE":
		return true
	}
	return false
}

func seconds(name string, def int) time.Duration {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	return time.Duration(def) * time.Second
}

func cleanToken(t string) string {
	return strings.TrimSpace(strings.NewReplacer("\r", "", "\n", "").Replace(t))
}

func expandHome(p string) string {
	if p == "~" || strings.HasPrefix(p, "~/") {
		if h, err := userdir.Home(); err == nil {
			return filepath.Join(h, p[1:])
		}
	}
	return os.ExpandEnv(p)
}

// sameHost says whether u is on the Hub's own host, the only one the token
// goes to.
func (c *Client) sameHost(u *url.URL) bool {
	e, err := url.Parse(c.Endpoint)
	return err == nil && strings.EqualFold(e.Host, u.Host)
}

// request is one HTTP request of the client.
type request struct {
	method string
	url    string
	header http.Header
	// retryNetwork retries transport errors too; off where the cache may
	// stand in (resolving a revision), so an offline machine falls back at
	// once, as huggingface_hub does.
	retryNetwork bool
}

// do sends r, following relative redirects (a renamed repository) and
// retrying with backoff on 429, 5xx and, when asked, network errors. A
// response of status 3xx with another host in Location is returned as it
// is. The caller closes the body.
func (c *Client) do(ctx context.Context, r request) (*http.Response, error) {
	if c.Offline {
		return nil, &Error{Kind: ErrNotCached, Msg: "HF_HUB_OFFLINE is set"}
	}
	if u, err := url.Parse(c.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		// A mistyped HF_ENDPOINT is no Hub that cannot be reached: the
		// cache's fallback would hide it.
		return nil, fmt.Errorf("the Hub's address %q (HF_ENDPOINT) is not an http:// or https:// URL: write it as https://HOST", c.Endpoint)
	}
	target := r.url
	for attempt, redirects := 0, 0; ; {
		req, err := http.NewRequestWithContext(ctx, r.method, target, nil)
		if err != nil {
			return nil, err
		}
		for k, v := range r.header {
			req.Header[k] = v
		}
		req.Header.Set("User-Agent", c.UserAgent)
		if c.Token != "" && c.sameHost(req.URL) {
			req.Header.Set("Authorization", "Bearer "+c.Token)
		}
		resp, err := c.HTTP.Do(req)
		retry := false
		var wait time.Duration
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			if !r.retryNetwork || attempt >= c.Retries {
				return nil, c.unreachable(err)
			}
			retry = true
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			if attempt >= c.Retries {
				return resp, nil
			}
			if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
				wait = time.Duration(s) * time.Second
			}
			drain(resp)
			retry = true
		case resp.StatusCode >= 300 && resp.StatusCode < 400 && resp.Header.Get("Location") != "":
			loc, perr := req.URL.Parse(resp.Header.Get("Location"))
			if perr != nil || !strings.EqualFold(loc.Host, req.URL.Host) || redirects >= 10 {
				return resp, nil
			}
			drain(resp)
			target, redirects = loc.String(), redirects+1
			continue
		default:
			return resp, nil
		}
		if retry {
			attempt++
			if wait == 0 {
				wait = c.backoff(attempt)
			}
			if err := sleep(ctx, wait); err != nil {
				return nil, err
			}
		}
	}
}

// backoff is the wait before the attempt-th retry.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.Backoff
	for i := 1; i < attempt && d < c.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, max(c.MaxBackoff, c.Backoff))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// apiURL is an address under the Hub's API for repo.
func (c *Client) apiURL(repo Repo, parts ...string) string {
	return c.Endpoint + "/api/" + string(repo.Type) + "s/" + repo.ID + "/" + strings.Join(parts, "/")
}

// resolveURL is the address of a file of repo at commit.
func (c *Client) resolveURL(repo Repo, rev, file string) string {
	segs := strings.Split(file, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return c.Endpoint + "/" + repo.urlPrefix() + repo.ID + "/resolve/" + url.PathEscape(rev) + "/" + strings.Join(segs, "/")
}
