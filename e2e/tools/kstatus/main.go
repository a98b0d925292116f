// kstatus-eval prints the kstatus result (the health Flux computes) of Kubernetes objects.
// Test tool only: e2e/scripts/install-kstatus.sh builds it against sigs.k8s.io/cli-utils.
//
//	kstatus-eval FILE...   each FILE holds one object as JSON, or a fixture {"object": {...}}
//	kstatus-eval -         one object as JSON on stdin
//
// For each input it prints one line: "<file>\t<status>\t<message>".
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func evaluate(name string, data []byte) error {
	var doc map[string]interface{}
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: not JSON: %w", name, err)
	}
	if inner, ok := doc["object"].(map[string]interface{}); ok {
		doc = inner
	}
	// Through the same JSON decoding the Kubernetes client uses (integers stay int64).
	raw, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(raw); err != nil {
		return fmt.Errorf("%s: not a Kubernetes object: %w", name, err)
	}
	res, err := status.Compute(u)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	fmt.Printf("%s\t%s\t%s\n", name, res.Status, strings.ReplaceAll(res.Message, "\n", " "))
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kstatus-eval FILE... | -")
		os.Exit(2)
	}
	failed := false
	for _, arg := range os.Args[1:] {
		var data []byte
		var err error
		if arg == "-" {
			data, err = io.ReadAll(os.Stdin)
		} else {
			data, err = os.ReadFile(arg)
		}
		if err == nil {
			err = evaluate(arg, data)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}
