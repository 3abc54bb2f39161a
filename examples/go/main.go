// Minimal nanogate app-socket client: Go standard library only.
//
// Copy Send, Publish and Check into your app. Run this program to see all of them work:
//
//	TENDRL_SOCKET_PATH=/var/lib/tendrl/tendrl_agent.sock go run .
//
// The protocol (docs/architecture.md "App socket", sidecar/README.md): write one JSON message; replies have no
// delimiter, so this client uses one connection per request, half-closes its side after
// writing and reads the reply until the agent closes. An empty reply means "accepted".
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// SocketPath is where the injected nano-agent listens.
func SocketPath() string {
	for _, env := range []string{"TENDRL_SOCKET_PATH", "TENDRL_SOCKET"} {
		if p := os.Getenv(env); p != "" {
			return p
		}
	}
	return "/var/lib/tendrl/tendrl_agent.sock"
}

// AgentError is an {"status":"error","message":...} reply of the agent.
type AgentError struct{ Message string }

func (e *AgentError) Error() string { return e.Message }

// Send writes one message and returns the agent's reply (nil when it sent none).
func Send(message any) (json.RawMessage, error) {
	body, err := json.Marshal(message)
	if err != nil {
		return nil, err
	}
	conn, err := net.DialTimeout("unix", SocketPath(), 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("cannot talk to nano-agent at %s: %w", SocketPath(), err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write(body); err != nil {
		return nil, err
	}
	// "That was all": the agent answers, then closes.
	if err := conn.(*net.UnixConn).CloseWrite(); err != nil {
		return nil, err
	}
	reply, err := io.ReadAll(conn)
	if err != nil || len(reply) == 0 {
		return nil, err
	}
	var status struct {
		Status  string `json:"status"`
		Message string `json:"message"`
	}
	if json.Unmarshal(reply, &status) == nil && status.Status == "error" {
		return nil, &AgentError{status.Message}
	}
	return reply, nil
}

// Publish sends data (a map/struct or a string). wait=false: returns once the agent queued it.
// wait=true: sent at once; returns the platform's reply.
func Publish(data any, tags []string, wait bool) (json.RawMessage, error) {
	msg := map[string]any{"msg_type": "publish", "data": data}
	if len(tags) > 0 || wait {
		if tags == nil {
			tags = []string{} // "tags": [] rather than null
		}
		msg["context"] = map[string]any{"tags": tags, "wait": wait}
	}
	return Send(msg)
}

// Check returns the messages waiting for this app on the platform (at most limit, max 100).
func Check(limit int) ([]json.RawMessage, error) {
	reply, err := Send(map[string]any{"msg_type": "msg_check", "context": map[string]any{"limit": limit}})
	if err != nil || string(reply) == "204" {
		return []json.RawMessage{}, err
	}
	var msgs []json.RawMessage
	err = json.Unmarshal(reply, &msgs)
	return msgs, err
}

func main() {
	const lang = "go"
	fail := func(err error) {
		fmt.Fprintf(os.Stderr, "nanogate: %v\n", err)
		os.Exit(1)
	}
	if _, err := Publish(map[string]string{"example": lang, "step": "publish"}, []string{"example", lang}, false); err != nil {
		fail(err)
	}
	fmt.Println("publish: accepted")
	reply, err := Publish(map[string]string{"example": lang, "step": "wait"}, []string{"example"}, true)
	if err != nil {
		fail(err)
	}
	fmt.Println("publish with wait:", string(reply))
	msgs, err := Check(5)
	if err != nil {
		fail(err)
	}
	out, _ := json.Marshal(msgs)
	fmt.Println("msg_check:", string(out))

	tags := make([]string, 11)
	for i := range tags {
		tags[i] = fmt.Sprintf("t%d", i)
	}
	_, err = Publish(map[string]string{"example": lang, "step": "rejected"}, tags, false)
	if agentErr, ok := err.(*AgentError); ok {
		fmt.Println("error:", agentErr.Message)
	} else {
		fail(fmt.Errorf("expected an error reply, got %v", err))
	}
}
