module github.com/nanogate/nanogate/examples/go

go 1.19
