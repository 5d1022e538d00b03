from twisted.application.reactors import Reactor

privox = Reactor(
    "privox",
    "privox.reactor",
    "epoll(4), each plain read handed straight to its connection (privox/reactor.py).",
)
