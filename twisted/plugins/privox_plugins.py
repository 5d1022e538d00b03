from twisted.application.service import ServiceMaker

privoxFarm = ServiceMaker(
    "Privox producer farm", "privox.farm.service", "A Privox producer farm.", "privox-farm"
)
privoxNode = ServiceMaker(
    "Privox producer node", "privox.node.service", "A Privox producer node.", "privox-node"
)
privoxApi = ServiceMaker("Privox API server", "privox.api.service", "The Privox HTTP API.", "privox-api")
privoxLocal = ServiceMaker(
    "Privox local exchange",
    "privox.local",
    "A whole Privox exchange (farm, API, one node) in one process.",
    "privox-local",
)
