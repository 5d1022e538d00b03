from twisted.application.service import ServiceMaker

privoxFarm = ServiceMaker(
    "Privox producer farm", "privox.farm.service", "A Privox producer farm.", "privox-farm"
)
