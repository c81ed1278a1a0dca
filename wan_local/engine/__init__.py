"""One job, one path: a request is resolved once, admitted by a pure verdict, planned and run by one runner."""
