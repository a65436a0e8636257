module github.com/idemsvc/idemsvc/clients/go

go 1.26
